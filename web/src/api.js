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
  // Long work answers 202 with an operation: wait for it to end.
  if (response.status === 202 && data?.operation) return waitFor(data.operation);
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

/** Polls an operation until it ends; its final state, or its error thrown. */
export async function waitFor(operation) {
  let op = operation;
  while (op.state === 'running') {
    await new Promise((resolve) => setTimeout(resolve, 150));
    op = (await api('GET', `/operations/${encodeURIComponent(op.id)}`)).operation;
  }
  if (op.state !== 'succeeded') {
    throw new ApiError(409, op.error?.code ?? op.state, op.error?.message ?? `the operation ${op.state}`);
  }
  return op;
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body ?? {});
export const patch = (path, body) => api('PATCH', path, body);
export const del = (path) => api('DELETE', path);

export const enc = encodeURIComponent;

/** A WebSocket URL on this origin (cookies go along). */
export function wsUrl(path) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}/api/v1${path}`;
}

/**
 * The daemon's event stream. `handler` gets each VM event, `onOperation`
 * each operation as it starts, progresses and ends, `onPool` the name of
 * each desktop pool that changed; the browser reconnects by itself.
 * Returns a function that closes it.
 */
export function subscribe(handler, onOperation, onPool) {
  const source = new EventSource('/api/v1/events/stream', { withCredentials: true });
  const parsed = (message, then) => {
    try {
      then(JSON.parse(message.data));
    } catch {
      // A keep-alive or a malformed line: nothing to show.
    }
  };
  source.onmessage = (message) => parsed(message, handler);
  source.addEventListener('operation', (message) => parsed(message, (data) => onOperation(data.operation)));
  source.addEventListener('pool', (message) => parsed(message, (data) => onPool(data.pool)));
  return () => source.close();
}
