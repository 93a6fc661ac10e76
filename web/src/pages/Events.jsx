import { useEffect, useState } from 'preact/hooks';
import { get } from '../api.js';
import { onEvent } from '../store.js';
import { time } from '../format.js';
import { Empty, ErrorNote, StateBadge } from '../ui.jsx';

export function EventTable({ events, showVm = true }) {
  if (!events.length) return <Empty title="No events yet">Creating or starting a VM records one.</Empty>;
  return (
    <table class="table events">
      <thead>
        <tr>
          <th>When</th>
          {showVm ? <th>VM</th> : null}
          <th>Event</th>
          <th>State</th>
          <th>Why</th>
        </tr>
      </thead>
      <tbody>
        {events.map((e) => (
          <tr key={e.id}>
            <td class="nowrap muted">{time(e.at)}</td>
            {showVm ? (
              <td>
                <a href={`#/vms/${encodeURIComponent(e.vm)}`}>{e.vm}</a>
              </td>
            ) : null}
            <td>{e.kind}</td>
            <td>{e.state ? <StateBadge state={e.state} /> : '–'}</td>
            <td class="why">{e.cause}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

const PAGE = 50;

/** Newest first; older pages on request; new ones arrive live. */
export function Events({ vm }) {
  const [events, setEvents] = useState([]);
  const [older, setOlder] = useState(null); // `before` for the next older page
  const [error, setError] = useState(null);

  const filter = vm ? `&vm=${encodeURIComponent(vm)}` : '';
  const load = async (before) => {
    try {
      const page = await get(`/events?before=${before}&limit=${PAGE}${filter}`);
      setEvents((current) => (before === Number.MAX_SAFE_INTEGER ? [] : current).concat(page.events.reverse()));
      setOlder(page.next_before);
    } catch (err) {
      setError(err.message);
    }
  };

  useEffect(() => {
    load(Number.MAX_SAFE_INTEGER);
    return onEvent((event) => {
      if (!vm || event.vm === vm) setEvents((current) => [event, ...current]);
    });
  }, [vm]);

  return (
    <section>
      {vm ? null : (
        <header class="page-head">
          <h1>Events</h1>
        </header>
      )}
      <ErrorNote message={error} />
      <div class="card flush">
        <EventTable events={events} showVm={!vm} />
      </div>
      {older ? (
        <button type="button" class="btn" onClick={() => load(older)}>
          Older events
        </button>
      ) : null}
    </section>
  );
}
