import { useEffect, useState } from 'preact/hooks';
import { del, enc, get, post } from '../api.js';
import { onEvent } from '../store.js';
import { time } from '../format.js';
import { ActionButton, Empty, ErrorNote, Loading } from '../ui.jsx';

export function Networks() {
  const [list, setList] = useState(null);
  const [error, setError] = useState(null);
  const [form, setForm] = useState({ name: '', subnet: '' });
  const load = () => get('/networks').then(setList, (e) => setError(e.message));
  useEffect(() => {
    load();
    // Leases show up as `address` events.
    return onEvent((e) => {
      if (e.kind === 'address' || e.kind === 'deleted' || e.kind === 'created') load();
    });
  }, []);
  const create = async (e) => {
    e.preventDefault();
    try {
      await post('/networks', { name: form.name, subnet: form.subnet || undefined });
      setForm({ name: '', subnet: '' });
      setError(null);
      load();
    } catch (err) {
      setError(err.message);
    }
  };
  return (
    <section>
      <header class="page-head">
        <h1>Networks</h1>
      </header>
      <form class="toolbar" onSubmit={create}>
        <input aria-label="Network name" placeholder="name" required value={form.name} onInput={(e) => setForm({ ...form, name: e.currentTarget.value })} />
        <input aria-label="Subnet" placeholder="subnet (e.g. 10.90.0.0/24; empty: a free /24)" value={form.subnet} onInput={(e) => setForm({ ...form, subnet: e.currentTarget.value })} />
        <button type="submit" class="btn primary">
          Create network
        </button>
      </form>
      <ErrorNote message={error} onClose={() => setError(null)} />
      {!list ? (
        <Loading />
      ) : list.length === 0 ? (
        <Empty title="No managed networks">This host cannot make bridges (quetzald needs root); VMs use user-mode networking.</Empty>
      ) : (
        list.map((n) => (
          <div class="card" key={n.name} data-network={n.name}>
            <div class="row">
              <h2 class="grow">
                {n.name} <span class="muted mono small">{n.subnet}</span>
              </h2>
              {n.name !== 'default' ? (
                <ActionButton
                  kind="small danger"
                  action={async () => {
                    await del(`/networks/${enc(n.name)}`);
                    load();
                  }}
                  onError={setError}
                >
                  Delete
                </ActionButton>
              ) : null}
            </div>
            <p class="muted small">
              Gateway <span class="mono">{n.gateway}</span> · bridge <span class="mono">{n.bridge}</span> · VMs:{' '}
              {n.vms.join(', ') || 'none'}
            </p>
            {n.leases.length ? (
              <table class="table">
                <thead>
                  <tr>
                    <th>Address</th>
                    <th>MAC</th>
                    <th>VM</th>
                    <th>Hostname</th>
                    <th>Expires</th>
                  </tr>
                </thead>
                <tbody>
                  {n.leases.map((l) => (
                    <tr key={l.mac}>
                      <td class="mono">{l.address}</td>
                      <td class="mono">{l.mac}</td>
                      <td>{l.vm ? <a href={`#/vms/${enc(l.vm)}`}>{l.vm}</a> : '–'}</td>
                      <td>{l.hostname ?? '–'}</td>
                      <td class="muted">{l.expires_at ? time(l.expires_at) : 'never'}</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            ) : (
              <p class="muted">No DHCP leases yet.</p>
            )}
          </div>
        ))
      )}
    </section>
  );
}
