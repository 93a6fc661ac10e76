// The dashboard's only way to the daemon: fetch with the session cookie,
// errors as ApiError carrying the API's own message.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let unauthorized = () => {};

/** Called when the daemon answers 401 (the session ended). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export async function api(method, path, body) {
  const response = await fetch(`/api/v1${path}`, {
    method,
    credentials: 'same-origin',
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401 && path !== '/session') unauthorized();
    throw new ApiError(
      response.status,
      data?.error?.code ?? 'http',
      data?.error?.message ?? `${response.status} ${response.statusText}`,
    );
  }
  return data;
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body ?? {});
export const del = (path) => api('DELETE', path);

export const enc = encodeURIComponent;

/** A WebSocket URL on this origin (cookies go along). */
export function wsUrl(path) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}/api/v1${path}`;
}

/**
 * The daemon's event stream. `handler` gets each event; the browser
 * reconnects by itself. Returns a function that closes it.
 */
export function subscribe(handler) {
  const source = new EventSource('/api/v1/events/stream', { withCredentials: true });
  source.onmessage = (message) => {
    try {
      handler(JSON.parse(message.data));
    } catch {
      // A keep-alive or a malformed line: nothing to show.
    }
  };
  return () => source.close();
}
