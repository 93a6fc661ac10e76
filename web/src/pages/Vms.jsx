import { useMemo, useState } from 'preact/hooks';
import { stats, vms } from '../store.js';
import { ACTIONS, act, allowed, clone, remove, snapshot, snapshotName } from '../actions.js';
import { duration, mib, percent, bytes } from '../format.js';
import { ActionButton, Confirm, Empty, ErrorNote, Loading, StateBadge } from '../ui.jsx';

const COLUMNS = [
  ['name', 'Name'],
  ['state', 'State'],
  ['cpu', 'CPU'],
  ['memory', 'Memory'],
  ['addresses', 'Addresses'],
  ['uptime', 'Uptime'],
];

function sortValue(vm, key, s, now) {
  switch (key) {
    case 'cpu':
      return s?.cpu ?? -1;
    case 'memory':
      return vm.memory_mib;
    case 'addresses':
      return vm.addresses[0] ?? '';
    case 'uptime':
      return vm.started_at ? now - vm.started_at : -1;
    default:
      return vm[key];
  }
}

export function Vms({ query }) {
  const all = vms.value;
  const live = stats.value;
  const [filter, setFilter] = useState('');
  const [state, setState] = useState(query.get('state') ?? '');
  const [sort, setSort] = useState(['name', 1]);
  const [selected, setSelected] = useState(new Set());
  const [error, setError] = useState(null);
  const [deleting, setDeleting] = useState(null);
  const now = Date.now();

  const rows = useMemo(() => {
    if (!all) return [];
    const needle = filter.trim().toLowerCase();
    const [key, dir] = sort;
    return [...all.values()]
      .filter((vm) => !state || vm.state === state)
      .filter(
        (vm) =>
          !needle ||
          vm.name.toLowerCase().includes(needle) ||
          vm.addresses.some((a) => a.includes(needle)) ||
          Object.entries(vm.labels).some(([k, v]) => `${k}=${v}`.includes(needle)),
      )
      .sort((a, b) => {
        const x = sortValue(a, key, live.get(a.name), now);
        const y = sortValue(b, key, live.get(b.name), now);
        return (x < y ? -1 : x > y ? 1 : 0) * dir;
      });
  }, [all, filter, state, sort, live]);

  if (!all) return <Loading />;

  const toggle = (name) => {
    const next = new Set(selected);
    next.has(name) ? next.delete(name) : next.add(name);
    setSelected(next);
  };
  const bulk = async (action) => {
    const targets = [...selected].map((n) => all.get(n)).filter((vm) => vm && allowed(vm, action));
    const results = await Promise.allSettled(targets.map((vm) => act(vm.name, action)));
    const failed = results.filter((r) => r.status === 'rejected').map((r) => r.reason.message);
    setError(failed.length ? failed.join('; ') : null);
  };

  return (
    <section>
      <header class="page-head">
        <h1>Virtual machines</h1>
        <a class="btn primary" href="#/vms/new">
          Create VM
        </a>
      </header>
      <div class="toolbar">
        <input
          type="search"
          placeholder="Filter by name, address or label"
          aria-label="Filter VMs"
          value={filter}
          onInput={(e) => setFilter(e.currentTarget.value)}
        />
        <select aria-label="State" value={state} onChange={(e) => setState(e.currentTarget.value)}>
          <option value="">All states</option>
          {['running', 'paused', 'stopped', 'crashed', 'starting', 'stopping'].map((s) => (
            <option value={s} key={s}>
              {s}
            </option>
          ))}
        </select>
        <span class="grow" />
        <ActionButton action={() => bulk('start')} disabled={!selected.size} onError={setError}>
          Start selected
        </ActionButton>
        <ActionButton action={() => bulk('stop')} disabled={!selected.size} onError={setError}>
          Stop selected
        </ActionButton>
      </div>
      <ErrorNote message={error} onClose={() => setError(null)} />
      {all.size === 0 ? (
        <Empty title="No virtual machines yet">
          <a href="#/vms/new">Create one</a> from an image or a template.
        </Empty>
      ) : (
        <div class="card flush scroll-x">
          <table class="table vms" data-testid="vm-table">
            <thead>
              <tr>
                <th class="check">
                  <input
                    type="checkbox"
                    aria-label="Select all"
                    checked={rows.length > 0 && rows.every((vm) => selected.has(vm.name))}
                    onChange={(e) =>
                      setSelected(e.currentTarget.checked ? new Set(rows.map((vm) => vm.name)) : new Set())
                    }
                  />
                </th>
                {COLUMNS.map(([key, label]) => (
                  <th key={key} aria-sort={sort[0] === key ? (sort[1] > 0 ? 'ascending' : 'descending') : 'none'}>
                    <button
                      type="button"
                      class="sort"
                      onClick={() => setSort([key, sort[0] === key ? -sort[1] : 1])}
                    >
                      {label}
                      {sort[0] === key ? (sort[1] > 0 ? ' ↑' : ' ↓') : ''}
                    </button>
                  </th>
                ))}
                <th>Actions</th>
              </tr>
            </thead>
            <tbody>
              {rows.map((vm) => {
                const s = live.get(vm.name);
                return (
                  <tr key={vm.name} data-vm={vm.name}>
                    <td class="check">
                      <input
                        type="checkbox"
                        aria-label={`Select ${vm.name}`}
                        checked={selected.has(vm.name)}
                        onChange={() => toggle(vm.name)}
                      />
                    </td>
                    <td>
                      <a href={`#/vms/${encodeURIComponent(vm.name)}`} class="strong">
                        {vm.name}
                      </a>
                      <div class="muted small">
                        {vm.cpus} vCPU · {vm.image}
                        {vm.linked_to ? ` · clone of ${vm.linked_to}` : ''}
                      </div>
                    </td>
                    <td>
                      <StateBadge state={vm.state} />
                    </td>
                    <td class="num">{vm.state === 'running' ? percent(s?.cpu) : '–'}</td>
                    <td class="num">
                      {s ? `${bytes(s.rss)} / ` : ''}
                      {mib(vm.memory_mib)}
                    </td>
                    <td class="mono">{vm.addresses.join(', ') || <span class="muted">{vm.network}</span>}</td>
                    <td class="num">{vm.started_at ? duration(now - vm.started_at) : '–'}</td>
                    <td class="actions">
                      {Object.entries(ACTIONS)
                        .filter(([action]) => allowed(vm, action))
                        .map(([action, { label, kind }]) => (
                          <ActionButton
                            key={action}
                            kind={`small ${kind ?? ''}`}
                            action={() => act(vm.name, action)}
                            onError={setError}
                            aria-label={`${label} ${vm.name}`}
                          >
                            {label}
                          </ActionButton>
                        ))}
                      <ActionButton
                        kind="small"
                        action={() => snapshot(vm.name, snapshotName())}
                        onError={setError}
                        aria-label={`Snapshot ${vm.name}`}
                      >
                        Snapshot
                      </ActionButton>
                      {['stopped', 'crashed'].includes(vm.state) ? (
                        <ActionButton
                          kind="small"
                          action={async () => {
                            const name = prompt(`Name of the clone of ${vm.name}`, `${vm.name}-clone`);
                            if (name) await clone(vm.name, name);
                          }}
                          onError={setError}
                          aria-label={`Clone ${vm.name}`}
                        >
                          Clone
                        </ActionButton>
                      ) : null}
                      {['stopped', 'crashed'].includes(vm.state) ? (
                        <button
                          type="button"
                          class="btn small danger"
                          aria-label={`Delete ${vm.name}`}
                          onClick={() => setDeleting(vm.name)}
                        >
                          Delete
                        </button>
                      ) : null}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
          {rows.length === 0 ? <Empty title="No VM matches">Change the filter or the state.</Empty> : null}
        </div>
      )}
      {deleting ? (
        <Confirm
          title={`Delete ${deleting}?`}
          body="Its disks are deleted too. This cannot be undone."
          confirmLabel="Delete"
          onCancel={() => setDeleting(null)}
          onConfirm={async () => {
            const name = deleting;
            setDeleting(null);
            try {
              await remove(name);
            } catch (err) {
              setError(err.message);
            }
          }}
        />
      ) : null}
    </section>
  );
}
