import { useEffect, useState } from 'preact/hooks';
import { post } from '../api.js';
import { ErrorNote } from '../ui.jsx';

/** Trades the API token for a session cookie. A link with `#token=…`
 * (what `quetzal up` prints) logs in at once. */
export function Login({ onLogin }) {
  const [token, setToken] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (value) => {
    setBusy(true);
    setError(null);
    try {
      await post('/session', { token: value.trim() });
      onLogin();
    } catch (err) {
      setError(err.status === 401 ? 'That token is not right. `quetzal token` prints it.' : err.message);
    } finally {
      setBusy(false);
    }
  };
  useEffect(() => {
    // Opened as a link, or the link pasted while this page shows.
    const fromLink = () => {
      const linked = new URLSearchParams(location.hash.slice(1)).get('token');
      if (linked) {
        // Out of the address bar and history, on to the overview.
        location.replace('#/');
        submit(linked);
      }
    };
    fromLink();
    window.addEventListener('hashchange', fromLink);
    return () => window.removeEventListener('hashchange', fromLink);
  }, []);
  return (
    <main class="login">
      <form
        class="card form"
        onSubmit={(e) => {
          e.preventDefault();
          submit(token);
        }}
      >
        <h1>
          <span class="logo" aria-hidden="true" /> Quetzal
        </h1>
        <p class="muted">Log in with this node's API token (run <code>quetzal token</code> on the host).</p>
        <ErrorNote message={error} />
        <label>
          API token
          <input type="password" name="token" autocomplete="current-password" required value={token} onInput={(e) => setToken(e.currentTarget.value)} autofocus />
        </label>
        <button type="submit" class="btn primary" disabled={busy || !token}>
          Log in
        </button>
      </form>
    </main>
  );
}
