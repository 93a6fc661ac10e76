import { useEffect, useState } from 'preact/hooks';
import { get } from '../api.js';
import { time } from '../format.js';
import { Empty, ErrorNote } from '../ui.jsx';

const KEEP = 500;

/** The audit log, newest first; new rows arrive as they are written (each
 * request waits up to 30 s for one). Admins only: others get the API's
 * 403 message. */
export function Audit() {
  const [rows, setRows] = useState([]);
  const [error, setError] = useState(null);

  useEffect(() => {
    let stopped = false;
    (async () => {
      let after = 0;
      while (!stopped) {
        try {
          const wait = after === 0 ? 0 : 30;
          const page = await get(`/audit?after=${after}&limit=1000&wait_secs=${wait}`);
          if (stopped) return;
          if (page.length) {
            after = page[page.length - 1].id;
            setRows((current) => page.slice().reverse().concat(current).slice(0, KEEP));
          }
          setError(null);
        } catch (err) {
          if (stopped) return;
          setError(err.message);
          return;
        }
      }
    })();
    return () => {
      stopped = true;
    };
  }, []);

  return (
    <section>
      <header class="page-head">
        <h1>Audit log</h1>
      </header>
      <ErrorNote message={error} />
      <div class="card flush">
        {rows.length ? (
          <table class="table audit">
            <thead>
              <tr>
                <th>When</th>
                <th>Who</th>
                <th>From</th>
                <th>Request</th>
                <th>Status</th>
              </tr>
            </thead>
            <tbody>
              {rows.map((r) => (
                <tr key={r.id} data-testid="audit-row">
                  <td class="nowrap muted">{time(r.at)}</td>
                  <td>{r.who}</td>
                  <td class="muted">{r.source}</td>
                  <td class="mono">
                    {r.method} {r.path}
                  </td>
                  <td class={r.status >= 400 ? 'bad' : ''}>{r.status}</td>
                </tr>
              ))}
            </tbody>
          </table>
        ) : error ? null : (
          <Empty title="Nothing changed yet">Every change made through the API is written here.</Empty>
        )}
      </div>
    </section>
  );
}
