// The dashboard: a login, then pages over the daemon's API, kept live by
// its event stream. Routes are in the URL's hash (#/vms/web?tab=serial).

import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { del, get, onUnauthorized } from './api.js';
import * as store from './store.js';
import { Overview } from './pages/Overview.jsx';
import { Vms } from './pages/Vms.jsx';
import { CreateVm } from './pages/CreateVm.jsx';
import { VmDetail } from './pages/VmDetail.jsx';
import { Templates } from './pages/Templates.jsx';
import { Networks } from './pages/Networks.jsx';
import { Pools } from './pages/Pools.jsx';
import { DesktopScreen } from './consoles.jsx';
import { Events } from './pages/Events.jsx';
import { Audit } from './pages/Audit.jsx';
import { Login } from './pages/Login.jsx';
import { ErrorNote, Loading, Operations } from './ui.jsx';
import './style.css';

const NAV = [
  ['#/', 'Overview'],
  ['#/vms', 'Virtual machines'],
  ['#/templates', 'Templates'],
  ['#/pools', 'Desktop pools'],
  ['#/networks', 'Networks'],
  ['#/events', 'Events'],
  ['#/audit', 'Audit'],
];

function parseRoute() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, search] = raw.split('?');
  return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(search) };
}

function useRoute() {
  const [route, setRoute] = useState(parseRoute);
  useEffect(() => {
    const update = () => setRoute(parseRoute());
    window.addEventListener('hashchange', update);
    return () => window.removeEventListener('hashchange', update);
  }, []);
  return route;
}

function Page({ route }) {
  const [first, second] = route.parts;
  if (!first) return <Overview />;
  if (first === 'vms' && second === 'new') return <CreateVm />;
  if (first === 'vms' && second) return <VmDetail name={second} query={route.query} />;
  if (first === 'vms') return <Vms query={route.query} />;
  if (first === 'templates') return <Templates />;
  if (first === 'pools') return <Pools />;
  if (first === 'networks') return <Networks />;
  if (first === 'events') return <Events />;
  if (first === 'audit') return <Audit />;
  return <ErrorNote message={`No page at ${location.hash}`} />;
}

function useTheme() {
  const [theme, setTheme] = useState(() => localStorage.getItem('theme') ?? 'auto');
  useEffect(() => {
    document.documentElement.dataset.theme = theme;
    localStorage.setItem('theme', theme);
  }, [theme]);
  return [theme, setTheme];
}

function App() {
  const [session, setSession] = useState('checking'); // checking | out | in
  const [error, setError] = useState(null);
  const [theme, setTheme] = useTheme();
  const route = useRoute();

  const enter = async () => {
    try {
      await store.start();
      setSession('in');
    } catch (err) {
      if (err.status === 401) setSession('out');
      else setError(err.message);
    }
  };
  useEffect(() => {
    onUnauthorized(() => {
      store.stop();
      setSession('out');
    });
    get('/host').then(enter, (err) => (err.status === 401 ? setSession('out') : setError(err.message)));
    return () => store.stop();
  }, []);

  if (error) return <ErrorNote message={`Cannot reach quetzald: ${error}`} />;
  if (session === 'checking') return <Loading />;
  if (session === 'out') return <Login onLogin={enter} />;

  // A pool user's desktop: the whole window, no dashboard around it.
  if (route.parts[0] === 'desktop' && route.parts[1]) return <DesktopScreen vm={route.parts[1]} />;

  const current = `#/${route.parts[0] ?? ''}`;
  return (
    <div class="shell">
      <nav class="sidebar" aria-label="Main">
        <a class="brand" href="#/">
          <span class="logo" aria-hidden="true" /> Quetzal
        </a>
        {NAV.map(([href, label]) => (
          <a key={href} href={href} class={current === href ? 'active' : ''} aria-current={current === href ? 'page' : undefined}>
            {label}
          </a>
        ))}
        <span class="grow" />
        <Operations operations={[...store.operations.value.values()]} />
        <label class="theme">
          Theme
          <select value={theme} onChange={(e) => setTheme(e.currentTarget.value)}>
            <option value="auto">system</option>
            <option value="light">light</option>
            <option value="dark">dark</option>
          </select>
        </label>
        <button
          type="button"
          class="btn ghost"
          onClick={async () => {
            await del('/session').catch(() => {});
            store.stop();
            setSession('out');
          }}
        >
          Log out
        </button>
      </nav>
      <main class="content">
        <Page route={route} />
      </main>
    </div>
  );
}

render(<App />, document.getElementById('app'));
