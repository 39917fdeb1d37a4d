//! `results.md`, `results.json` and the plots of an evaluation.
//!
//! Plots are always written as SVG (text is left to the viewer's fonts) and
//! also as PNG when a system font is found (Debian's fonts-dejavu-core, which
//! `.ci/setup` installs, or the usual macOS fonts); no font is committed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{Aggregate, SampleResult};

/// Where the PNG plots' text font may be.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Header facts of a run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub model: String,
    pub machine: String,
    pub commit: String,
    pub command: String,
    pub n_ctx: u32,
}

fn budget_label(b: &serde_json::Value, method: &str) -> String {
    if method == "none" {
        return "full".into();
    }
    match b.as_f64() {
        Some(x) if x <= 1.0 => format!("{}%", (x * 1000.0).round() / 10.0),
        Some(x) => format!("{x} tok"),
        None => b.to_string(),
    }
}

/// The markdown table: task × method rows, budget columns, with the gap to the full cache.
pub fn markdown(info: &RunInfo, aggs: &[Aggregate]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# chunkkv eval\n");
    let _ = writeln!(
        md,
        "- model: `{}`\n- machine: {}\n- commit: `{}`\n- context: {}\n- command: `{}`\n",
        info.model, info.machine, info.commit, info.n_ctx, info.command
    );
    let _ = writeln!(
        md,
        "Scores are in [0, 1] (fidelity: top-1 agreement with the full cache, with mean KL \
         and perplexity); the gap to the full cache is in points of score.\n"
    );
    let mut tasks: Vec<&str> = Vec::new();
    for a in aggs {
        if !tasks.contains(&a.task.as_str()) {
            tasks.push(&a.task);
        }
    }
    for task in tasks {
        let rows: Vec<&Aggregate> = aggs.iter().filter(|a| a.task == task).collect();
        let full = rows.iter().find(|a| a.method == "none");
        let mut budgets: Vec<serde_json::Value> = Vec::new();
        let mut methods: Vec<&str> = Vec::new();
        for a in rows.iter().filter(|a| a.method != "none") {
            if !budgets.contains(&a.budget) {
                budgets.push(a.budget.clone());
            }
            if !methods.contains(&a.method.as_str()) {
                methods.push(&a.method);
            }
        }
        let _ = writeln!(md, "## {task}\n");
        if let Some(f) = full {
            let extra = match (f.kl, f.ppl) {
                (Some(_), Some(p)) => format!(", perplexity {p:.2}"),
                _ => String::new(),
            };
            let _ = writeln!(md, "Full cache: **{:.3}** (n = {}){extra}\n", f.score, f.n);
        }
        let _ = write!(md, "| method |");
        for b in &budgets {
            let _ = write!(md, " {} |", budget_label(b, "x"));
        }
        let _ = writeln!(md);
        let _ = writeln!(md, "|---|{}", "---|".repeat(budgets.len()));
        for m in &methods {
            let _ = write!(md, "| {m} |");
            for b in &budgets {
                match rows.iter().find(|a| a.method == *m && a.budget == *b) {
                    Some(a) => {
                        let gap = full.map_or(String::new(), |f| {
                            format!(" ({:+.1})", 100.0 * (a.score - f.score))
                        });
                        let kl = a.kl.map_or(String::new(), |k| {
                            format!(" · KL {k:.4} · ppl {:.2}", a.ppl.unwrap_or(0.0))
                        });
                        let _ = write!(md, " {:.3}{gap}{kl} |", a.score);
                    }
                    None => {
                        let _ = write!(md, " – |");
                    }
                }
            }
            let _ = writeln!(md);
        }
        let _ = writeln!(md);
    }
    md.push_str(&versus(aggs));
    md
}

/// Below this full-cache score a task is left out of the head-to-head: the
/// model cannot do it, so there is nothing for compression to keep.
const CAPABLE: f64 = 0.2;
/// Fidelity's KL counts as a win or loss beyond this relative difference.
const KL_TIE: f64 = 0.05;

/// How ChunkKV fares against one baseline at one task and budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Win,
    Tie,
    Loss,
}

/// Score tasks: a gap counts when it is more than one sample's worth (1/n).
/// Fidelity: mean KL from the full cache, lower is better, ±5% is a tie.
pub fn verdict(chunkkv: &Aggregate, other: &Aggregate) -> Verdict {
    let (better, worse) = match (chunkkv.kl, other.kl) {
        (Some(a), Some(b)) => (a < b * (1.0 - KL_TIE), a > b * (1.0 + KL_TIE)),
        _ => {
            let step = 1.0 / chunkkv.n.min(other.n).max(1) as f64 + 1e-9;
            let d = chunkkv.score - other.score;
            (d > step, d < -step)
        }
    };
    match (better, worse) {
        (true, _) => Verdict::Win,
        (_, true) => Verdict::Loss,
        _ => Verdict::Tie,
    }
}

/// The head-to-head sections: each ChunkKV variant (`chunkkv`,
/// `chunkkv:reconstruct`) against every other compressing method, per task
/// and budget, and the tally.
/// What recall cost per question (`+recall` methods), by task, method and
/// prompt length (rounded to 1k tokens); empty when nothing recalled.
pub fn recall_cost(samples: &[SampleResult]) -> String {
    type Key = (String, String, usize);
    let mut groups: Vec<(Key, Vec<&crate::compress::RecallTurn>)> = Vec::new();
    for s in samples {
        let Some(r) = s.recall.as_ref() else { continue };
        let key = (s.task.clone(), s.method.clone(), (s.n_prompt + 512) / 1024);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    if groups.is_empty() {
        return String::new();
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Recall cost per question\n\nMeans over the questions of each prompt length: \
         evicted cells written back for scoring, tokens per layer the question's \
         compression kept of them, MiB moved each way, milliseconds spent moving and \
         ranking rows (scoring in the question's own decode excluded), and the \
         sequence's peak cells before it was compacted to the budget again.\n"
    );
    let _ = writeln!(
        md,
        "| task | method | length | n | uploaded | back | MiB up | MiB down | ms | of which ranking | peak cells |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    for ((task, method, k), rs) in &groups {
        let n = rs.len() as f64;
        let mean = |f: &dyn Fn(&crate::compress::RecallTurn) -> f64| {
            rs.iter().map(|r| f(r)).sum::<f64>() / n
        };
        let mib = (1u64 << 20) as f64;
        let _ = writeln!(
            md,
            "| {task} | {method} | {k}k | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
            rs.len(),
            mean(&|r| r.uploaded as f64),
            mean(&|r| r.tokens as f64),
            mean(&|r| r.bytes_up as f64 / mib),
            mean(&|r| r.bytes_down as f64 / mib),
            mean(&|r| r.ms),
            mean(&|r| r.rank_ms),
            mean(&|r| f64::from(r.transient_cells)),
        );
    }
    md.push('\n');
    md
}

fn versus(aggs: &[Aggregate]) -> String {
    let mut variants: Vec<&str> = Vec::new();
    for a in aggs {
        if a.method.starts_with("chunkkv") && !variants.contains(&a.method.as_str()) {
            variants.push(&a.method);
        }
    }
    variants.into_iter().map(|v| versus_one(aggs, v)).collect()
}

fn versus_one(aggs: &[Aggregate], variant: &str) -> String {
    let mut md = String::new();
    let ours: Vec<&Aggregate> = aggs.iter().filter(|a| a.method == variant).collect();
    let mut rivals: Vec<&str> = Vec::new();
    for a in aggs {
        if a.method != "none" && a.method != variant && !rivals.contains(&a.method.as_str()) {
            rivals.push(&a.method);
        }
    }
    if ours.is_empty() || rivals.is_empty() {
        return md;
    }
    let title = if variant == "chunkkv" {
        "ChunkKV".to_string()
    } else {
        format!("ChunkKV ({})", variant.trim_start_matches("chunkkv:"))
    };
    let _ = writeln!(md, "## {title} against each baseline\n");
    let _ = writeln!(
        md,
        "Each cell: {title}'s score minus the baseline's, in points, and the verdict. A gap \
         counts as a win or loss when it is more than one sample's worth (100/n points); \
         fidelity compares the mean KL from the full cache instead (lower is better, within \
         {:.0}% is a tie). Tasks whose full-cache score is below {CAPABLE} are left out: the \
         model cannot do them.\n",
        KL_TIE * 100.0
    );
    let full = |task: &str| {
        aggs.iter()
            .find(|a| a.task == task && a.method == "none")
            .map(|a| a.score)
    };
    let mut tally: Vec<[usize; 3]> = vec![[0; 3]; rivals.len()];
    let mut skipped: Vec<&str> = Vec::new();
    let _ = writeln!(md, "| task | budget | {} |", rivals.join(" | "));
    let _ = writeln!(md, "|---|---|{}", "---|".repeat(rivals.len()));
    for c in &ours {
        if full(&c.task).is_some_and(|f| f < CAPABLE) {
            if !skipped.contains(&c.task.as_str()) {
                skipped.push(&c.task);
            }
            continue;
        }
        let _ = write!(md, "| {} | {} |", c.task, budget_label(&c.budget, "x"));
        for (i, r) in rivals.iter().enumerate() {
            let Some(o) = aggs
                .iter()
                .find(|a| a.task == c.task && a.method == *r && a.budget == c.budget)
            else {
                let _ = write!(md, " – |");
                continue;
            };
            let v = verdict(c, o);
            tally[i][v as usize] += 1;
            let word = match v {
                Verdict::Win => "**win**",
                Verdict::Tie => "tie",
                Verdict::Loss => "**loss**",
            };
            let gap = match (c.kl, o.kl) {
                (Some(a), Some(b)) if b > 0.0 => format!("KL {:+.0}%", 100.0 * (a / b - 1.0)),
                _ => format!("{:+.1}", 100.0 * (c.score - o.score)),
            };
            let _ = write!(md, " {word} {gap} |");
        }
        let _ = writeln!(md);
    }
    let _ = write!(md, "| **wins / ties / losses** | |");
    for t in &tally {
        let _ = write!(md, " {} / {} / {} |", t[0], t[1], t[2]);
    }
    let _ = writeln!(md, "\n");
    if !skipped.is_empty() {
        let _ = writeln!(
            md,
            "Left out (full cache below {CAPABLE}): {}.\n",
            skipped.join(", ")
        );
    }
    md
}

/// `results.json`: the header, the aggregates and every sample.
pub fn json(info: &RunInfo, aggs: &[Aggregate], samples: &[SampleResult]) -> serde_json::Value {
    serde_json::json!({
        "header": info,
        "results": aggs,
        "samples": samples,
    })
}

/// A line chart: x = budget, y = score, one series per method.
struct Lines {
    title: String,
    series: Vec<(String, Vec<(f64, f64)>)>,
    full: Option<f64>,
}

/// A heatmap: rows = depths, columns = lengths.
struct Heat {
    title: String,
    lengths: Vec<usize>,
    depths: Vec<f64>,
    /// `values[depth][length]`, `None` when missing.
    values: Vec<Vec<Option<f64>>>,
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
];
const COLORS_RGB: &[(u8, u8, u8)] = &[
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (227, 119, 194),
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Red (0) to green (1).
fn heat_rgb(v: f64) -> (u8, u8, u8) {
    let v = v.clamp(0.0, 1.0);
    (
        (220.0 * (1.0 - v) + 30.0) as u8,
        (60.0 + 150.0 * v) as u8,
        70,
    )
}

fn lines_svg(p: &Lines) -> String {
    let (w, h, l, r, t, b) = (640.0, 400.0, 60.0, 150.0, 40.0, 50.0);
    let xs: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.1.iter().map(|q| q.0))
        .collect();
    let (x0, x1) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min).min(0.0),
        xs.iter().copied().fold(0.0f64, f64::max).max(1e-9),
    );
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| h - b - y.clamp(0.0, 1.0) * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        (w - r + l) / 2.0,
        esc(&p.title)
    );
    for i in 0..=4 {
        let y = i as f64 / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{l}\" x2=\"{x2}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#ddd\"/><text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{y:.2}</text>",
            x2 = w - r,
            yy = py(y),
            tx = l - 6.0,
            ty = py(y) + 4.0
        );
    }
    let mut ticks: Vec<f64> = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x}</text>",
            px(x),
            h - b + 18.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">KV budget</text><text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">score</text>",
        (w - r + l) / 2.0,
        h - 12.0,
        (h - b + t) / 2.0,
        (h - b + t) / 2.0
    );
    if let Some(f) = p.full {
        let _ = writeln!(
            s,
            "<line x1=\"{l}\" x2=\"{x2}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"black\" stroke-dasharray=\"5,4\"/>\
             <text x=\"{tx}\" y=\"{ty}\">full cache</text>",
            x2 = w - r,
            yy = py(f),
            tx = w - r + 8.0,
            ty = py(f) + 4.0
        );
    }
    for (i, (name, pts)) in p.series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for &(x, y) in pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>",
                px(x),
                py(y)
            );
        }
        let ly = t + 20.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            w - r + 8.0,
            ly - 4.0,
            w - r + 26.0,
            ly,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn heat_svg(p: &Heat) -> String {
    let (l, t, cw, ch) = (70.0, 40.0, 80.0, 28.0);
    let w = l + cw * p.lengths.len() as f64 + 20.0;
    let h = t + ch * p.depths.len() as f64 + 50.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        esc(&p.title)
    );
    for (di, d) in p.depths.iter().enumerate() {
        let y = t + ch * di as f64;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}%</text>",
            l - 6.0,
            y + ch / 2.0 + 4.0,
            d * 100.0
        );
        for (li, v) in p.values[di].iter().enumerate() {
            let x = l + cw * li as f64;
            let (fill, label) = match v {
                Some(v) => {
                    let (r, g, b) = heat_rgb(*v);
                    (format!("rgb({r},{g},{b})"), format!("{v:.2}"))
                }
                None => ("#eee".to_string(), "–".to_string()),
            };
            let _ = writeln!(
                s,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cw}\" height=\"{ch}\" fill=\"{fill}\" stroke=\"white\"/>\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"white\">{label}</text>",
                x + cw / 2.0,
                y + ch / 2.0 + 4.0
            );
        }
    }
    let yb = t + ch * p.depths.len() as f64;
    for (li, len) in p.lengths.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{len}</text>",
            l + cw * li as f64 + cw / 2.0,
            yb + 16.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">context length (tokens); rows: needle depth</text>",
        w / 2.0,
        yb + 36.0
    );
    s.push_str("</svg>\n");
    s
}

/// Loads the first system font found for PNG text.
fn register_font() -> bool {
    use std::sync::OnceLock;
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        for path in FONTS {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(
                    "sans-serif",
                    plotters::style::FontStyle::Normal,
                    bytes,
                )
                .is_ok()
                {
                    return true;
                }
            }
        }
        false
    })
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn lines_png(p: &Lines, path: &Path) -> PlotResult {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.1.iter().map(|q| q.0))
        .collect();
    let x1 = xs.iter().copied().fold(0.0f64, f64::max).max(1e-9) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(&p.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0.0..x1, 0.0..1.05)?;
    chart
        .configure_mesh()
        .x_desc("KV budget")
        .y_desc("score")
        .draw()?;
    if let Some(f) = p.full {
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, f), (x1, f)],
                BLACK.stroke_width(1),
            ))?
            .label("full cache")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLACK));
    }
    for (i, (name, pts)) in p.series.iter().enumerate() {
        let (r, g, b) = COLORS_RGB[i % COLORS_RGB.len()];
        let color = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color));
        chart.draw_series(
            pts.iter()
                .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn heat_png(p: &Heat, path: &Path) -> PlotResult {
    use plotters::prelude::*;
    let (cw, ch) = (80u32, 28u32);
    let w = 90 + cw * p.lengths.len() as u32 + 20;
    let h = 50 + ch * p.depths.len() as u32 + 50;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let style = ("sans-serif", 13).into_font();
    root.draw(&Text::new(
        p.title.clone(),
        (10, 10),
        ("sans-serif", 16).into_font(),
    ))?;
    for (di, d) in p.depths.iter().enumerate() {
        let y = 40 + ch as i32 * di as i32;
        root.draw(&Text::new(
            format!("{:.0}%", d * 100.0),
            (30, y + 8),
            style.clone(),
        ))?;
        for (li, v) in p.values[di].iter().enumerate() {
            let x = 80 + cw as i32 * li as i32;
            let (fill, label) = match v {
                Some(v) => {
                    let (r, g, b) = heat_rgb(*v);
                    (RGBColor(r, g, b), format!("{v:.2}"))
                }
                None => (RGBColor(238, 238, 238), "-".into()),
            };
            root.draw(&Rectangle::new(
                [(x, y), (x + cw as i32 - 2, y + ch as i32 - 2)],
                fill.filled(),
            ))?;
            root.draw(&Text::new(
                label,
                (x + 26, y + 8),
                style.clone().color(&WHITE),
            ))?;
        }
    }
    let yb = 40 + ch as i32 * p.depths.len() as i32;
    for (li, len) in p.lengths.iter().enumerate() {
        root.draw(&Text::new(
            len.to_string(),
            (80 + cw as i32 * li as i32 + 24, yb + 6),
            style.clone(),
        ))?;
    }
    root.draw(&Text::new(
        "context length (tokens); rows: needle depth".to_string(),
        (80, yb + 28),
        style,
    ))?;
    root.present()?;
    Ok(())
}

/// Writes the plots into `dir`; returns the files written.
pub fn plots(
    dir: &Path,
    aggs: &[Aggregate],
    samples: &[SampleResult],
) -> std::io::Result<Vec<PathBuf>> {
    let png = register_font();
    let mut written = Vec::new();
    let mut tasks: Vec<&str> = Vec::new();
    for a in aggs {
        if !tasks.contains(&a.task.as_str()) {
            tasks.push(&a.task);
        }
    }
    for task in tasks {
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        let mut full = None;
        for a in aggs.iter().filter(|a| a.task == task) {
            if a.method == "none" {
                full = Some(a.score);
                continue;
            }
            let x = a.budget.as_f64().unwrap_or(0.0);
            match series.iter_mut().find(|s| s.0 == a.method) {
                Some(s) => s.1.push((x, a.score)),
                None => series.push((a.method.to_string(), vec![(x, a.score)])),
            }
        }
        for s in &mut series {
            s.1.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let plot = Lines {
            title: format!("{task}: score vs KV budget"),
            series,
            full,
        };
        let base = dir.join(format!("score-vs-budget-{}", file_slug(task)));
        std::fs::write(base.with_extension("svg"), lines_svg(&plot))?;
        written.push(base.with_extension("svg"));
        if png {
            match lines_png(&plot, &base.with_extension("png")) {
                Ok(()) => written.push(base.with_extension("png")),
                Err(e) => tracing::warn!("PNG plot {}: {e}", base.display()),
            }
        }
    }

    // NIAH heatmaps, one per task (mode), method and budget.
    let niah: Vec<&SampleResult> = samples.iter().filter(|s| s.cell.is_some()).collect();
    let mut configs: Vec<(&str, &str, serde_json::Value)> = Vec::new();
    for s in &niah {
        if !configs
            .iter()
            .any(|c| c.0 == s.task && c.1 == s.method && c.2 == s.budget)
        {
            configs.push((&s.task, &s.method, s.budget.clone()));
        }
    }
    let mut lengths: Vec<usize> = niah.iter().map(|s| s.cell.unwrap().0).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut depths: Vec<f64> = niah.iter().map(|s| s.cell.unwrap().1).collect();
    depths.sort_by(f64::total_cmp);
    depths.dedup();
    for (task, method, budget) in configs {
        let values = depths
            .iter()
            .map(|&d| {
                lengths
                    .iter()
                    .map(|&l| {
                        let v: Vec<f64> = niah
                            .iter()
                            .filter(|s| {
                                s.task == task
                                    && s.method == method
                                    && s.budget == budget
                                    && s.cell == Some((l, d))
                            })
                            .map(|s| s.score)
                            .collect();
                        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
                    })
                    .collect()
            })
            .collect();
        let label = budget_label(&budget, method);
        let plot = Heat {
            title: format!("{}, {method} {label}", task.replacen("niah", "NIAH", 1)),
            lengths: lengths.clone(),
            depths: depths.clone(),
            values,
        };
        let slug: String = label
            .chars()
            .map(|c| match c {
                '.' => 'p',
                c if c.is_ascii_alphanumeric() => c,
                _ => '_',
            })
            .collect();
        let base = dir.join(format!("{}-{}-{slug}", file_slug(task), file_slug(method)));
        std::fs::write(base.with_extension("svg"), heat_svg(&plot))?;
        written.push(base.with_extension("svg"));
        if png {
            match heat_png(&plot, &base.with_extension("png")) {
                Ok(()) => written.push(base.with_extension("png")),
                Err(e) => tracing::warn!("PNG plot {}: {e}", base.display()),
            }
        }
    }
    Ok(written)
}

/// A name safe in file names: letters, digits and `-`, the rest `_` (runs collapsed).
fn file_slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '-' {
            c
        } else {
            '_'
        };
        if !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    out.trim_matches('_').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(task: &str, method: &str, budget: f64, score: f64, n: usize) -> Aggregate {
        Aggregate {
            task: task.into(),
            method: method.into(),
            budget: serde_json::json!(budget),
            score,
            n,
            kl: None,
            ppl: None,
        }
    }

    #[test]
    fn a_gap_counts_only_beyond_one_sample_or_five_percent_kl() {
        let ours = agg("niah", "chunkkv", 0.1, 0.5, 10);
        for (theirs, want) in [
            (0.4, Verdict::Tie),
            (0.6, Verdict::Tie),
            (0.3, Verdict::Win),
            (0.7, Verdict::Loss),
        ] {
            assert_eq!(
                verdict(&ours, &agg("niah", "snapkv", 0.1, theirs, 10)),
                want
            );
        }
        let kl = |method: &str, k: f64| Aggregate {
            kl: Some(k),
            ..agg("fidelity", method, 0.1, 0.8, 4)
        };
        assert_eq!(
            verdict(&kl("chunkkv", 0.10), &kl("snapkv", 0.12)),
            Verdict::Win
        );
        assert_eq!(
            verdict(&kl("chunkkv", 0.10), &kl("snapkv", 0.103)),
            Verdict::Tie
        );
        assert_eq!(
            verdict(&kl("chunkkv", 0.10), &kl("snapkv", 0.09)),
            Verdict::Loss
        );
    }

    #[test]
    fn the_head_to_head_tallies_and_leaves_out_what_the_model_cannot_do() {
        let aggs = vec![
            agg("niah", "none", 1.0, 0.9, 10),
            agg("niah", "chunkkv", 0.1, 0.8, 10),
            agg("niah", "snapkv", 0.1, 0.5, 10),
            agg("niah", "h2o", 0.1, 0.8, 10),
            agg("gsm8k-icl", "none", 1.0, 0.1, 10),
            agg("gsm8k-icl", "chunkkv", 0.1, 0.0, 10),
            agg("gsm8k-icl", "snapkv", 0.1, 0.1, 10),
            agg("gsm8k-icl", "h2o", 0.1, 0.1, 10),
        ];
        let md = versus(&aggs);
        assert!(md.contains("| task | budget | snapkv | h2o |"), "{md}");
        assert!(
            md.contains("| niah | 10% | **win** +30.0 | tie +0.0 |"),
            "{md}"
        );
        assert!(md.contains("| 1 / 0 / 0 | 0 / 1 / 0 |"), "{md}");
        assert!(!md.contains("| gsm8k-icl |"), "{md}");
        assert!(
            md.contains("Left out (full cache below 0.2): gsm8k-icl."),
            "{md}"
        );
        // Without a rival there is nothing to compare.
        assert!(versus(&aggs[..2]).is_empty());
    }
}
