// Shared pieces: state badges, buttons that run an action and show its
// error, the confirmation dialog, empty states.

import { useEffect, useRef, useState } from 'preact/hooks';

export function StateBadge({ state }) {
  return <span class={`badge state-${state}`} data-state={state}>{state}</span>;
}

/** A button running an async action: disabled while it runs. */
export function ActionButton({ action, onError, children, kind = '', ...rest }) {
  const [busy, setBusy] = useState(false);
  const run = async () => {
    setBusy(true);
    try {
      await action();
    } catch (err) {
      onError?.(err.message);
    } finally {
      setBusy(false);
    }
  };
  return (
    <button type="button" class={`btn ${kind}`} disabled={busy || rest.disabled} onClick={run} {...rest}>
      {busy ? <span class="spinner" aria-hidden="true" /> : null}
      {children}
    </button>
  );
}

export function ErrorNote({ message, onClose }) {
  if (!message) return null;
  return (
    <div class="error-note" role="alert">
      <span>{message}</span>
      {onClose ? (
        <button type="button" class="btn ghost small" onClick={onClose} aria-label="Dismiss">
          ✕
        </button>
      ) : null}
    </div>
  );
}

/** A modal confirmation; resolves through onConfirm/onCancel. */
export function Confirm({ title, body, confirmLabel, onConfirm, onCancel }) {
  const dialog = useRef(null);
  useEffect(() => {
    dialog.current?.showModal();
  }, []);
  return (
    <dialog ref={dialog} class="dialog" onCancel={onCancel} aria-labelledby="confirm-title">
      <h2 id="confirm-title">{title}</h2>
      <p>{body}</p>
      <div class="row end">
        <button type="button" class="btn" onClick={onCancel}>
          Cancel
        </button>
        <button type="button" class="btn danger" onClick={onConfirm} autofocus>
          {confirmLabel}
        </button>
      </div>
    </dialog>
  );
}

export function Empty({ title, children }) {
  return (
    <div class="empty">
      <h3>{title}</h3>
      <p>{children}</p>
    </div>
  );
}

export function Loading() {
  return <div class="loading" aria-busy="true">Loading…</div>;
}

const OPERATION_WORDS = {
  'full-clone': 'Full clone',
  'clone-vm': 'Clone',
  'create-template': 'Template',
  'build-image': 'Image build',
  'snapshot-create': 'Snapshot',
  'snapshot-revert': 'Revert',
  'snapshot-delete': 'Delete snapshot',
};

/** Operations running now (and, briefly, how they ended), with progress. */
export function Operations({ operations }) {
  if (operations.length === 0) return null;
  return (
    <section class="operations" aria-label="Operations" data-testid="operations">
      {operations.map((op) => (
        <div key={op.id} class={`operation op-${op.state}`} data-operation={op.id} data-state={op.state}>
          <div class="operation-head">
            <span>{OPERATION_WORDS[op.kind] ?? op.kind}</span>
            <span class="muted">{op.target.replace('/api/v1/', '')}</span>
          </div>
          <progress max="100" value={op.progress} aria-label={`${op.kind} ${op.progress}%`} />
          {op.state === 'running' ? null : <span class="muted small">{op.error?.message ?? op.state}</span>}
        </div>
      ))}
    </section>
  );
}
