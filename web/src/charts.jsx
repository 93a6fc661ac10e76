// Live charts of a running VM's counters, with uPlot.

import { useEffect, useRef } from 'preact/hooks';
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';

const POINTS = 60;

/** A colour variable of the current theme, resolved to rgb(). */
function cssColor(name) {
  const probe = document.createElement('span');
  probe.style.color = `var(${name})`;
  document.body.append(probe);
  const colour = getComputedStyle(probe).color;
  probe.remove();
  return colour;
}

/** One chart; `series` are [label, colour]; `data` is [times, ...values];
 * `floor` is the least the y axis shows. */
export function Chart({ title, series, data, format, floor = 1 }) {
  const box = useRef(null);
  const plot = useRef(null);
  useEffect(() => {
    const width = box.current.clientWidth || 320;
    // Canvas strokes cannot use CSS variables: read the theme's colours.
    const muted = cssColor('--muted');
    const grid = cssColor('--grid');
    plot.current = new uPlot(
      {
        width,
        height: 150,
        legend: { show: true },
        cursor: { show: false },
        // From zero, and never flatter than `floor` (an idle VM reads as
        // idle, not as noise blown up to the full height).
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max * 1.2, floor)] } },
        axes: [
          { stroke: muted, grid: { stroke: grid } },
          { stroke: muted, grid: { stroke: grid }, values: (u, v) => v.map(format), size: 70 },
        ],
        series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, value: (u, v) => (v == null ? '–' : format(v)) }))],
      },
      data,
      box.current,
    );
    const resize = () => plot.current?.setSize({ width: box.current.clientWidth, height: 150 });
    window.addEventListener('resize', resize);
    return () => {
      window.removeEventListener('resize', resize);
      plot.current?.destroy();
    };
  }, []);
  useEffect(() => {
    plot.current?.setData(data);
  }, [data]);
  return (
    <figure class="chart">
      <figcaption>{title}</figcaption>
      <div ref={box} />
    </figure>
  );
}

/** Turns successive counter readings into rates for the charts. */
export function toSeries(readings) {
  const t = [];
  const cpu = [];
  const mem = [];
  const guest = [];
  const diskR = [];
  const diskW = [];
  const netR = [];
  const netS = [];
  for (let i = 1; i < readings.length; i += 1) {
    const a = readings[i - 1];
    const b = readings[i];
    const dt = (b.at - a.at) / 1000;
    if (dt <= 0) continue;
    t.push(b.at / 1000);
    cpu.push(((b.cpu_seconds - a.cpu_seconds) / dt) * 100);
    mem.push(b.resident_bytes);
    guest.push(b.guest_memory_used_bytes ?? null);
    diskR.push((b.disk_read_bytes - a.disk_read_bytes) / dt);
    diskW.push((b.disk_written_bytes - a.disk_written_bytes) / dt);
    netR.push((b.net_received_bytes - a.net_received_bytes) / dt);
    netS.push((b.net_sent_bytes - a.net_sent_bytes) / dt);
  }
  return { t, cpu, mem, guest, diskR, diskW, netR, netS };
}

export { POINTS };
