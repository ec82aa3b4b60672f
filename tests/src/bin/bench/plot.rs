//! Grouped bar charts as standalone SVG, for BENCHMARKS.md.

use std::fmt::Write as _;

/// A chart to write next to BENCHMARKS.md.
pub struct Plot {
    /// File name under the plots directory, e.g. `e2e-connections.svg`.
    pub file: String,
    /// Alt text and heading for the Markdown image link.
    pub title: String,
    pub svg: String,
}

/// Value axis scale.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    Log,
}

/// Series colours (colour-blind safe, Okabe–Ito).
const COLOURS: [&str; 8] = [
    "#999999", "#0072B2", "#E69F00", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442",
];

const W: f64 = 860.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const PLOT_H: f64 = 300.0;
const BOTTOM: f64 = 110.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Human tick labels: 1500 → "1.5k", 0.25 → "0.25".
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Maps a value to its height, 0..1 from the bottom of the plot.
type Position = Box<dyn Fn(f64) -> f64>;

/// Ticks for the value axis: (value, position 0..1 from the bottom).
fn ticks(max: f64, min_positive: f64, scale: Scale) -> (Vec<(f64, f64)>, Position) {
    match scale {
        Scale::Linear => {
            let raw = max / 5.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 2.5, 5.0, 10.0]
                .iter()
                .map(|m| m * mag)
                .find(|s| *s >= raw)
                .unwrap_or(mag * 10.0);
            let top = (max / step).ceil() * step;
            let ticks = (0..=((top / step).round() as usize))
                .map(|i| (i as f64 * step, i as f64 * step / top))
                .collect();
            (ticks, Box::new(move |v: f64| v / top))
        }
        Scale::Log => {
            let lo = 10f64.powf(min_positive.log10().floor());
            let hi = 10f64.powf(max.log10().ceil()).max(lo * 10.0);
            let span = (hi / lo).log10();
            let mut ticks = Vec::new();
            let mut t = lo;
            while t <= hi * 1.0001 {
                ticks.push((t, (t / lo).log10() / span));
                t *= 10.0;
            }
            (
                ticks,
                Box::new(move |v: f64| ((v.max(lo)) / lo).log10() / span),
            )
        }
    }
}

/// A grouped bar chart: one group per `groups` entry, one bar per series in
/// each; `values[g][s]` (NaN for none). Each bar is labelled with its value.
pub fn grouped_bars(
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[String],
    values: &[Vec<f64>],
    scale: Scale,
) -> String {
    let max = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1e-9);
    let min_positive = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(f64::MAX, f64::min)
        .min(max);
    let (tick_list, pos) = ticks(max, min_positive, scale);
    let legend_rows = series.len().div_ceil(4);
    // Many groups: their names slant, and need the room below.
    let slant = groups.len() > 4;
    let bottom = if slant { BOTTOM + 110.0 } else { BOTTOM };
    let h = TOP + PLOT_H + bottom + legend_rows as f64 * 20.0;
    let plot_w = W - LEFT - RIGHT;
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = (group_w * 0.8) / series.len().max(1) as f64;
    let y = |v: f64| TOP + PLOT_H - pos(v) * PLOT_H;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    for (v, p) in &tick_list {
        let ty = TOP + PLOT_H - p * PLOT_H;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            ty + 4.0,
            short(*v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + PLOT_H / 2.0,
        escape(y_label)
    );
    for (g, name) in groups.iter().enumerate() {
        let gx = LEFT + g as f64 * group_w + group_w * 0.1;
        for (k, v) in values.get(g).into_iter().flatten().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x = gx + k as f64 * bar_w;
            let top = y(*v);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                (bar_w - 2.0).max(1.0),
                (TOP + PLOT_H - top).max(0.0),
                COLOURS[k % COLOURS.len()],
                escape(series.get(k).map_or("", String::as_str)),
                short(*v)
            );
            // Values on the bars only where they fit; the tooltip has them always.
            if bar_w >= 24.0 {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                    x + bar_w / 2.0 - 1.0,
                    top - 3.0,
                    short(*v)
                );
            }
        }
        let (gx, gy) = (
            LEFT + g as f64 * group_w + group_w / 2.0,
            TOP + PLOT_H + 18.0,
        );
        if slant {
            let _ = writeln!(
                s,
                r#"<text x="{gx:.1}" y="{gy:.1}" text-anchor="end" transform="rotate(-30 {gx:.1} {gy:.1})">{}</text>"#,
                escape(name)
            );
        } else {
            let _ = writeln!(
                s,
                r#"<text x="{gx:.1}" y="{gy:.1}" text-anchor="middle">{}</text>"#,
                escape(name)
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#333"/>"##,
        W - RIGHT,
        TOP + PLOT_H,
        TOP + PLOT_H
    );
    for (k, name) in series.iter().enumerate() {
        let lx = LEFT + (k % 4) as f64 * (plot_w / 4.0);
        let ly = TOP + PLOT_H + bottom - 60.0 + (k / 4) as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 10.0,
            COLOURS[k % COLOURS.len()],
            lx + 16.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}
