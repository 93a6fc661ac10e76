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
  const [oldest, setOldest] = useState(null);
  const [more, setMore] = useState(false);
  const [error, setError] = useState(null);

  const filter = vm ? `&vm=${encodeURIComponent(vm)}` : '';

  // The event log pages forward from an id; to read it newest first, find
  // the end, then step back a page at a time.
  const loadBefore = async (before) => {
    try {
      let after = Math.max(0, (before ?? Number.MAX_SAFE_INTEGER) - PAGE);
      if (before == null) {
        const all = await get(`/events?limit=1000${filter}`);
        let page = all;
        let last = all.events;
        while (page.next_after) {
          page = await get(`/events?limit=1000&after=${page.next_after}${filter}`);
          last = last.concat(page.events);
        }
        const newest = last.slice(-PAGE).reverse();
        setEvents(newest);
        setOldest(newest.at(-1)?.id ?? null);
        setMore(last.length > PAGE);
        return;
      }
      const page = await get(`/events?limit=${PAGE}&after=${after}${filter}`);
      const older = page.events.filter((e) => e.id < before).reverse();
      setEvents((current) => current.concat(older));
      setOldest(older.at(-1)?.id ?? before);
      setMore(after > 0 && older.length > 0);
    } catch (err) {
      setError(err.message);
    }
  };

  useEffect(() => {
    loadBefore(null);
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
      {more ? (
        <button type="button" class="btn" onClick={() => loadBefore(oldest)}>
          Older events
        </button>
      ) : null}
    </section>
  );
}
