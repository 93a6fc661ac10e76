import { useEffect, useState } from 'preact/hooks';
import { get, post } from '../api.js';
import { refreshVm } from '../store.js';
import { ErrorNote } from '../ui.jsx';

export function CreateVm() {
  const [templates, setTemplates] = useState([]);
  const [networks, setNetworks] = useState([]);
  const [form, setForm] = useState({
    name: '',
    source: 'image:tiny',
    full: false,
    cpus: 1,
    memory: 256,
    disk: '',
    network: '',
    restart: 'never',
    start: true,
  });
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    get('/templates').then(setTemplates, (e) => setError(e.message));
    get('/networks').then(setNetworks, (e) => setError(e.message));
  }, []);

  const set = (key) => (e) => {
    const target = e.currentTarget;
    setForm({ ...form, [key]: target.type === 'checkbox' ? target.checked : target.value });
  };

  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    const [kind, source] = form.source.split(':');
    const body = {
      name: form.name,
      cpus: Number(form.cpus),
      memory_mib: Number(form.memory),
      restart_policy: form.restart,
    };
    if (kind === 'image') body.image = source;
    else {
      body.template = source;
      body.full_clone = form.full;
    }
    if (form.disk !== '') body.disk_mib = Number(form.disk);
    if (form.network) body.network = form.network;
    try {
      // A full clone answers with its operation, waited for here.
      await post('/vms', body);
      if (form.start) await post(`/vms/${encodeURIComponent(form.name)}/start`);
      await refreshVm(form.name);
      location.hash = `#/vms/${encodeURIComponent(form.name)}`;
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };

  const isTemplate = form.source.startsWith('template:');
  return (
    <section>
      <header class="page-head">
        <h1>Create a virtual machine</h1>
      </header>
      <form class="card form" onSubmit={submit} noValidate>
        <ErrorNote message={error} />
        <label>
          Name
          <input name="name" required value={form.name} onInput={set('name')} placeholder="web-1" autofocus />
        </label>
        <label>
          Start from
          <select name="source" value={form.source} onChange={set('source')}>
            <optgroup label="Images">
              <option value="image:tiny">tiny (Debian kernel, busybox)</option>
            </optgroup>
            {templates.length ? (
              <optgroup label="Templates">
                {templates.map((t) => (
                  <option value={`template:${t.name}`} key={t.name}>
                    {t.name} ({t.image})
                  </option>
                ))}
              </optgroup>
            ) : null}
          </select>
        </label>
        {isTemplate ? (
          <label class="check">
            <input type="checkbox" checked={form.full} onChange={set('full')} /> Full clone (an independent copy;
            otherwise a linked clone made instantly)
          </label>
        ) : null}
        <div class="grid3">
          <label>
            vCPUs
            <input name="cpus" type="number" min="1" value={form.cpus} onInput={set('cpus')} />
          </label>
          <label>
            Memory (MiB)
            <input name="memory" type="number" min="32" step="32" value={form.memory} onInput={set('memory')} />
          </label>
          <label>
            Disk (MiB)
            <input name="disk" type="number" placeholder="the image's" value={form.disk} onInput={set('disk')} />
          </label>
        </div>
        <div class="grid3">
          <label>
            Network
            <select name="network" value={form.network} onChange={set('network')}>
              <option value="">default</option>
              {networks
                .filter((n) => n.name !== 'default')
                .map((n) => (
                  <option value={n.name} key={n.name}>
                    {n.name} ({n.subnet})
                  </option>
                ))}
              <option value="user">user-mode (no inbound)</option>
            </select>
          </label>
          <label>
            Restart policy
            <select name="restart" value={form.restart} onChange={set('restart')}>
              <option value="never">never</option>
              <option value="on-failure">on failure</option>
              <option value="always">always</option>
            </select>
          </label>
          <label class="check align-end">
            <input type="checkbox" checked={form.start} onChange={set('start')} /> Start it now
          </label>
        </div>
        <div class="row end">
          <a class="btn" href="#/vms">
            Cancel
          </a>
          <button type="submit" class="btn primary" disabled={busy}>
            {busy ? <span class="spinner" aria-hidden="true" /> : null}
            Create
          </button>
        </div>
      </form>
    </section>
  );
}
