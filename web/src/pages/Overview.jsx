import { host, recentEvents, vms } from '../store.js';
import { bytes, mib } from '../format.js';
import { EventTable } from './Events.jsx';
import { Loading } from '../ui.jsx';

const STATES = ['running', 'paused', 'stopped', 'crashed', 'starting', 'stopping'];

export function Overview() {
  const h = host.value;
  const all = vms.value;
  if (!h || !all) return <Loading />;
  const counts = {};
  for (const vm of all.values()) counts[vm.state] = (counts[vm.state] ?? 0) + 1;
  return (
    <section>
      <header class="page-head">
        <h1>Overview</h1>
      </header>
      <div class="cards">
        <div class="card host-card">
          <h2>Host</h2>
          <dl class="facts">
            <dt>CPU</dt>
            <dd>{h.cpu_model} · {h.cpus} threads</dd>
            <dt>Memory</dt>
            <dd>{mib(h.memory_mib)}</dd>
            <dt>Acceleration</dt>
            <dd>
              <span class={`badge accel-${h.accel}`} data-testid="accel">{h.accel}</span>{' '}
              <span class="muted">{h.accel_reason}</span>
            </dd>
            <dt>QEMU</dt>
            <dd>{h.qemu_version ?? 'not found'}</dd>
            <dt>KSM</dt>
            <dd data-testid="ksm">
              {h.ksm
                ? `${h.ksm.mode} · ${h.ksm.running ? 'running' : 'stopped'} · ${bytes(h.ksm.saved_bytes)} saved`
                : 'not in this kernel'}
            </dd>
          </dl>
        </div>
        <div class="card">
          <h2>Virtual machines</h2>
          <div class="counts">
            <a class="count" href="#/vms">
              <strong data-testid="count-all">{all.size}</strong>
              <span>total</span>
            </a>
            {STATES.filter((s) => counts[s] || ['running', 'stopped'].includes(s)).map((s) => (
              <a class="count" href={`#/vms?state=${s}`} key={s}>
                <strong class={`state-text-${s}`} data-testid={`count-${s}`}>
                  {counts[s] ?? 0}
                </strong>
                <span>{s}</span>
              </a>
            ))}
          </div>
        </div>
      </div>
      <div class="card">
        <h2>Recent events</h2>
        <EventTable events={recentEvents.value.slice(0, 10)} />
      </div>
    </section>
  );
}
