import { useEffect, useState } from 'preact/hooks';
import { del, enc, get } from '../api.js';
import { mib, time } from '../format.js';
import { ActionButton, Empty, ErrorNote, Loading } from '../ui.jsx';

export function Templates() {
  const [list, setList] = useState(null);
  const [error, setError] = useState(null);
  const load = () => get('/templates').then(setList, (e) => setError(e.message));
  useEffect(() => {
    load();
  }, []);
  return (
    <section>
      <header class="page-head">
        <h1>Templates</h1>
      </header>
      <ErrorNote message={error} onClose={() => setError(null)} />
      {!list ? (
        <Loading />
      ) : list.length === 0 ? (
        <Empty title="No templates">
          Turn a stopped VM into one with <code>quetzal template create NAME --from VM</code>; clones of it are made in
          milliseconds.
        </Empty>
      ) : (
        <div class="card flush scroll-x">
          <table class="table">
            <thead>
              <tr>
                <th>Name</th>
                <th>Image</th>
                <th>Size</th>
                <th>From VM</th>
                <th>Created</th>
                <th>Linked clones</th>
                <th>Actions</th>
              </tr>
            </thead>
            <tbody>
              {list.map((t) => (
                <tr key={t.name}>
                  <td class="strong">{t.name}</td>
                  <td>{t.image}</td>
                  <td>
                    {t.cpus} vCPU · {mib(t.memory_mib)} · {mib(t.disk_mib)} disk
                  </td>
                  <td>{t.source_vm}</td>
                  <td class="muted">{time(t.created_at)}</td>
                  <td>{t.linked_clones.join(', ') || '–'}</td>
                  <td class="actions">
                    <a class="btn small" href="#/vms/new">
                      New VM
                    </a>
                    <ActionButton
                      kind="small danger"
                      action={async () => {
                        await del(`/templates/${enc(t.name)}`);
                        load();
                      }}
                      onError={setError}
                    >
                      Delete
                    </ActionButton>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
