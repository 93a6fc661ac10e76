// Desktop pools: how many desktops each keeps ready, who holds which, and
// what to do with them — live from the event stream's `pool` messages.

import { useEffect, useState } from 'preact/hooks';
import { del, enc, get, patch, post } from '../api.js';
import { onEvent, onPool } from '../store.js';
import { time } from '../format.js';
import { ActionButton, Empty, ErrorNote, Loading, StateBadge } from '../ui.jsx';

const EMPTY_FORM = { name: '', template: '', spare: 2, max: 10, persistent: false };

export function Pools() {
  const [pools, setPools] = useState(null);
  const [templates, setTemplates] = useState([]);
  const [error, setError] = useState(null);
  const [form, setForm] = useState(EMPTY_FORM);
  const load = () => get('/pools').then(setPools, (e) => setError(e.message));
  useEffect(() => {
    load();
    get('/templates').then(setTemplates, () => {});
    const offPool = onPool(load);
    // A desktop's VM starting or stopping changes what its pool shows.
    const offEvent = onEvent((e) => {
      if (e.kind === 'started' || e.kind === 'stopped' || e.kind === 'crashed' || e.kind === 'deleted') load();
    });
    return () => {
      offPool();
      offEvent();
    };
  }, []);
  const create = async (e) => {
    e.preventDefault();
    try {
      await post('/pools', {
        name: form.name,
        template: form.template,
        spare: Number(form.spare),
        max: Number(form.max),
        persistent: form.persistent,
      });
      setForm(EMPTY_FORM);
      setError(null);
      load();
    } catch (err) {
      setError(err.message);
    }
  };
  const field = (key) => ({
    value: form[key],
    onInput: (e) => setForm({ ...form, [key]: e.currentTarget.value }),
  });
  return (
    <section>
      <header class="page-head">
        <h1>Desktop pools</h1>
      </header>
      <form class="toolbar" onSubmit={create} aria-label="New pool">
        <input aria-label="Pool name" placeholder="name" required {...field('name')} />
        <select aria-label="Template" required {...field('template')}>
          <option value="">template…</option>
          {templates.map((t) => (
            <option key={t.name} value={t.name}>
              {t.name}
              {t.warm ? ' (warm)' : ''}
            </option>
          ))}
        </select>
        <label>
          Spare <input aria-label="Spare" type="number" min="0" max="1000" class="narrow" {...field('spare')} />
        </label>
        <label>
          Max <input aria-label="Max" type="number" min="1" max="1000" class="narrow" {...field('max')} />
        </label>
        <label>
          <input type="checkbox" checked={form.persistent} onChange={(e) => setForm({ ...form, persistent: e.currentTarget.checked })} />{' '}
          persistent
        </label>
        <button type="submit" class="btn primary">
          Create pool
        </button>
      </form>
      <ErrorNote message={error} onClose={() => setError(null)} />
      {!pools ? (
        <Loading />
      ) : pools.length === 0 ? (
        <Empty title="No desktop pools">
          A pool keeps desktops running and ready from a template (a warm one makes instant clones):{' '}
          <code>quetzal pool create lab --template desk --spare 2 --max 30</code>.
        </Empty>
      ) : (
        pools.map((pool) => <PoolCard key={pool.name} pool={pool} templates={templates} reload={load} onError={setError} />)
      )}
    </section>
  );
}

function PoolCard({ pool, templates, reload, onError }) {
  const [user, setUser] = useState('');
  const [assigned, setAssigned] = useState(null);
  const held = pool.desktops.filter((d) => d.state === 'assigned' || d.state === 'held').length;
  return (
    <div class="card" data-pool={pool.name}>
      <div class="row">
        <h2 class="grow">
          {pool.name} <span class="muted small">{pool.persistent ? 'persistent' : 'reset on release'}</span>
        </h2>
        <ActionButton
          kind="small danger"
          action={async () => {
            await del(`/pools/${enc(pool.name)}`);
            reload();
          }}
          onError={onError}
        >
          Delete
        </ActionButton>
      </div>
      <p class="small">
        <span data-testid="ready">{pool.ready}</span> of {pool.spare} spares ready · {held} in use ·{' '}
        {pool.desktops.length} of {pool.max} desktops · template{' '}
        <select
          aria-label={`Template of ${pool.name}`}
          value={pool.template}
          onChange={async (e) => {
            try {
              await patch(`/pools/${enc(pool.name)}`, { template: e.currentTarget.value });
              reload();
            } catch (err) {
              onError(err.message);
            }
          }}
        >
          {templates.map((t) => (
            <option key={t.name} value={t.name}>
              {t.name}
            </option>
          ))}
        </select>
      </p>
      {pool.error ? <p class="error small">Last failure: {pool.error}</p> : null}
      <form
        class="toolbar"
        onSubmit={async (e) => {
          e.preventDefault();
          try {
            setAssigned(await post(`/pools/${enc(pool.name)}/assign`, user ? { user } : {}));
            setUser('');
            reload();
          } catch (err) {
            onError(err.message);
          }
        }}
      >
        <input aria-label={`User for ${pool.name}`} placeholder="user (default: you)" value={user} onInput={(e) => setUser(e.currentTarget.value)} />
        <button type="submit" class="btn">
          Assign a desktop
        </button>
        {assigned ? (
          <span class="small">
            {assigned.vm} for {assigned.user}:{' '}
            <a href={assigned.path} target="_blank" rel="noopener">
              open full-window
            </a>
          </span>
        ) : null}
      </form>
      {pool.desktops.length ? (
        <table class="table">
          <thead>
            <tr>
              <th>Desktop</th>
              <th>Pool state</th>
              <th>VM</th>
              <th>Template</th>
              <th>User</th>
              <th>Since</th>
              <th>Actions</th>
            </tr>
          </thead>
          <tbody>
            {pool.desktops.map((d) => (
              <tr key={d.vm} data-desktop={d.vm}>
                <td class="strong">
                  <a href={`#/vms/${enc(d.vm)}`}>{d.vm}</a>
                </td>
                <td>{d.state}</td>
                <td>{d.vm_state ? <StateBadge state={d.vm_state} /> : '–'}</td>
                <td>{d.template}</td>
                <td>{d.user ?? '–'}</td>
                <td class="muted">{d.assigned_at ? time(d.assigned_at) : '–'}</td>
                <td class="actions">
                  <a class="btn small" href={d.path} target="_blank" rel="noopener">
                    Open
                  </a>
                  {d.state === 'assigned' ? (
                    <ActionButton
                      kind="small"
                      action={async () => {
                        await post(`/pools/${enc(pool.name)}/desktops/${enc(d.vm)}/release`);
                        reload();
                      }}
                      onError={onError}
                    >
                      Release
                    </ActionButton>
                  ) : null}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : (
        <p class="muted">No desktops yet.</p>
      )}
    </div>
  );
}
