//! The analysis of traced systems: distance matrices over layers, every layer against the
//! last, layer-by-layer comparison with a second system; written as CSV, JSON and PNG, and
//! summarised on stdout.

use super::settings::library_metrics;
use super::{AnalyzeArgs, System};
use crate::options::{print_json, GlobalOptions};
use anyhow::{Context, Result};
use dynexec_dsa::layers::{compare_systems, cross_layer_matrices, layer_matrices, max_components};
use dynexec_dsa::{Dsa, Metric, Trajectories};
use dynexec_plot::heatmap::{write_png, Heatmap};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Serialize)]
struct Analysis<'a> {
    model: &'a str,
    positions: usize,
    features: usize,
    layers: Vec<usize>,
    /// metric -> layer × layer matrix.
    matrices: BTreeMap<&'static str, Vec<Vec<f64>>>,
    /// metric -> every layer against the last layer.
    vs_final: BTreeMap<&'static str, Vec<f64>>,
    /// Per layer, the normalised entropy of its DMD eigenvalue magnitudes (0: one mode
    /// dominates, 1: all modes alike); present when DSA was computed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    dmd_entropy: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    paired: Option<Paired>,
    /// Further comparisons by name (`verdicts`).
    #[serde(flatten)]
    extra: BTreeMap<&'static str, serde_json::Value>,
    files: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Paired {
    label: String,
    model: String,
    rows: Vec<PairedRow>,
    /// The second system's layers (the columns of `cross`).
    layers: Vec<usize>,
    /// metric -> every layer of the first system (rows) against every layer of the second
    /// (columns): all pairs, where `rows` holds those at the same relative depth.
    cross: BTreeMap<&'static str, Vec<Vec<f64>>>,
}

#[derive(Serialize)]
struct PairedRow {
    layer_a: usize,
    layer_b: usize,
    #[serde(flatten)]
    values: BTreeMap<&'static str, f64>,
}

pub fn analyse(
    global: &GlobalOptions,
    args: &AnalyzeArgs,
    dsa: &Dsa,
    primary: &System,
    second: Option<(&System, &str)>,
    extra: Option<(&'static str, serde_json::Value, Vec<PathBuf>)>,
) -> Result<()> {
    let metrics = library_metrics(&args.metric);
    let layers: Vec<usize> = primary.layers.iter().map(|(l, _)| *l).collect();
    let systems: Vec<Trajectories> = primary.layers.iter().map(|(_, t)| t.clone()).collect();
    let n = systems.len();
    eprintln!(
        "comparing {n} layers pairwise ({} metrics, {} positions each)...",
        metrics.len(),
        systems[0].time()
    );
    let components = dsa_components(args, dsa, systems[0].time());
    let (matrices, dmd_entropy) =
        layer_matrices(&systems, dsa, &metrics, components, global.threads)
            .context("computing the layer x layer matrices")?;

    let mut analysis = Analysis {
        model: &primary.info.model,
        positions: systems[0].time(),
        features: systems[0].features(),
        layers: layers.clone(),
        matrices: BTreeMap::new(),
        vs_final: BTreeMap::new(),
        dmd_entropy,
        paired: None,
        extra: BTreeMap::new(),
        files: Vec::new(),
    };
    if let Some((name, value, files)) = extra {
        analysis.extra.insert(name, value);
        analysis.files.extend(files);
    }
    let labels: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
    let mut missing_font = false;
    for matrix in &matrices {
        let name = matrix.metric.name();
        let rows: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..n).map(|j| matrix.get(i, j)).collect())
            .collect();
        let csv = args.out.join(format!("layers-{name}.csv"));
        write_csv(&csv, "layer", &labels, &rows)?;
        analysis.files.push(csv);
        if !args.no_plots {
            let png = args.out.join(format!("layers-{name}.png"));
            let title = format!("{} - {name} between layers", primary.info.model);
            let drew_text = write_png(
                &Heatmap::square(&title, &labels, "layer (0 = embeddings)", &matrix.values),
                &png,
            )?;
            missing_font |= !drew_text;
            analysis.files.push(png);
        }
        analysis
            .vs_final
            .insert(name, (0..n).map(|i| matrix.get(i, n - 1)).collect());
        analysis.matrices.insert(name, rows);
    }
    if let Some((other, label)) = second {
        let rows: Vec<PairedRow> =
            compare_systems(&primary.layers, &other.layers, dsa, components, &metrics)
                .context("comparing the two systems layer by layer")?
                .into_iter()
                .map(|p| PairedRow {
                    layer_a: p.layer_a,
                    layer_b: p.layer_b,
                    values: p.values,
                })
                .collect();
        let csv = args.out.join("paired.csv");
        let names: Vec<&str> = metrics.iter().map(|m| m.name()).collect();
        let table: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| names.iter().map(|n| r.values[n]).collect())
            .collect();
        let row_labels: Vec<String> = rows
            .iter()
            .map(|r| format!("{}/{}", r.layer_a, r.layer_b))
            .collect();
        write_csv_named(&csv, "layer_a/layer_b", &names, &row_labels, &table)?;
        analysis.files.push(csv);
        let (cross, files) =
            cross_matrices(global, args, dsa, components, primary, other, &metrics)?;
        missing_font |= files.iter().any(|(_, drew_text)| !drew_text);
        analysis.files.extend(files.into_iter().map(|(f, _)| f));
        analysis.paired = Some(Paired {
            label: label.to_string(),
            model: other.info.model.clone(),
            rows,
            layers: other.layers.iter().map(|(l, _)| *l).collect(),
            cross,
        });
    }

    if missing_font {
        eprintln!("note: no TrueType font found (set DYNEXEC_FONT=/path/to/font.ttf): heatmaps have no text");
    }
    let json_path = args.out.join("analysis.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&analysis)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    analysis.files.push(json_path);
    if global.json {
        return print_json(&analysis);
    }
    print_summary(&analysis, &metrics);
    Ok(())
}

/// Every layer of `primary` against every layer of `other` per metric: `cross-METRIC.csv`
/// and, unless `--no-plots`, `cross-METRIC.png` (the files, each with whether its text
/// could be drawn).
#[allow(clippy::type_complexity)]
fn cross_matrices(
    global: &GlobalOptions,
    args: &AnalyzeArgs,
    dsa: &Dsa,
    components: usize,
    primary: &System,
    other: &System,
    metrics: &[Metric],
) -> Result<(BTreeMap<&'static str, Vec<Vec<f64>>>, Vec<(PathBuf, bool)>)> {
    let states =
        |s: &System| -> Vec<Trajectories> { s.layers.iter().map(|(_, t)| t.clone()).collect() };
    let matrices = cross_layer_matrices(
        &states(primary),
        &states(other),
        dsa,
        metrics,
        components,
        global.threads,
    )
    .context("comparing every layer with every layer of the second system")?;
    let rows: Vec<String> = primary.layers.iter().map(|(l, _)| l.to_string()).collect();
    let columns: Vec<String> = other.layers.iter().map(|(l, _)| l.to_string()).collect();
    let mut out = BTreeMap::new();
    let mut files = Vec::new();
    for matrix in &matrices {
        let name = matrix.metric.name();
        let table: Vec<Vec<f64>> = (0..matrix.rows)
            .map(|i| (0..matrix.columns).map(|j| matrix.get(i, j)).collect())
            .collect();
        let csv = args.out.join(format!("cross-{name}.csv"));
        let column_names: Vec<&str> = columns.iter().map(String::as_str).collect();
        write_csv_named(&csv, "layer_a\\layer_b", &column_names, &rows, &table)?;
        files.push((csv, true));
        if !args.no_plots {
            let png = args.out.join(format!("cross-{name}.png"));
            let title = format!("{name}: {} vs {}", primary.info.model, other.info.model);
            let (row_axis, column_axis) = (
                format!("{} layer", primary.info.model),
                format!("{} layer", other.info.model),
            );
            let drew_text = write_png(
                &Heatmap {
                    title: &title,
                    row_labels: &rows,
                    column_labels: &columns,
                    row_axis: &row_axis,
                    column_axis: &column_axis,
                    values: &matrix.values,
                },
                &png,
            )?;
            files.push((png, drew_text));
        }
        out.insert(name, table);
    }
    Ok((out, files))
}

/// `--pca`, capped so the delay embedding of `time` positions has at least as many rows as
/// columns.
fn dsa_components(args: &AnalyzeArgs, dsa: &Dsa, time: usize) -> usize {
    let cap = max_components(dsa, time);
    if args.pca > cap {
        eprintln!(
            "note: --pca {} capped to {cap} components for {time} positions",
            args.pca
        );
    }
    args.pca.min(cap).max(1)
}

fn write_csv(path: &Path, corner: &str, labels: &[String], rows: &[Vec<f64>]) -> Result<()> {
    let columns: Vec<&str> = labels.iter().map(String::as_str).collect();
    write_csv_named(path, corner, &columns, labels, rows)
}

fn write_csv_named(
    path: &Path,
    corner: &str,
    columns: &[&str],
    row_labels: &[String],
    rows: &[Vec<f64>],
) -> Result<()> {
    let mut text = format!("{corner},{}\n", columns.join(","));
    for (label, row) in row_labels.iter().zip(rows) {
        let values: Vec<String> = row.iter().map(|v| format!("{v:.6}")).collect();
        text.push_str(&format!("{label},{}\n", values.join(",")));
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn print_summary(analysis: &Analysis, metrics: &[Metric]) {
    let names: Vec<&str> = metrics.iter().map(|m| m.name()).collect();
    println!(
        "{}: {} layers, {} positions x {} features",
        analysis.model,
        analysis.layers.len(),
        analysis.positions,
        analysis.features
    );
    let paired = analysis.paired.as_ref();
    let mut header = format!("{:>6}", "layer");
    if !analysis.dmd_entropy.is_empty() {
        header.push_str(&format!(" {:>12}", "dmd entropy"));
    }
    for name in &names {
        header.push_str(&format!(" {:>24}", format!("{name} vs last")));
    }
    if let Some(p) = paired {
        for name in &names {
            header.push_str(&format!(" {:>24}", format!("{name} {}", short(&p.label))));
        }
    }
    println!("{header}");
    for (i, layer) in analysis.layers.iter().enumerate() {
        let mut line = format!("{layer:>6}");
        if let Some(entropy) = analysis.dmd_entropy.get(i) {
            line.push_str(&format!(" {entropy:>12.4}"));
        }
        for name in &names {
            line.push_str(&format!(" {:>24.4}", analysis.vs_final[name][i]));
        }
        if let Some(p) = paired {
            for name in &names {
                let v = p.rows.get(i).map_or(f64::NAN, |r| r.values[name]);
                line.push_str(&format!(" {v:>24.4}"));
            }
        }
        println!("{line}");
    }
    if let Some(matrix) = analysis.matrices.get("dsa_angular") {
        let steps = (1..matrix.len()).map(|i| (i, matrix[i - 1][i]));
        if let Some((i, v)) = steps.max_by(|a, b| a.1.total_cmp(&b.1)) {
            println!(
                "largest DSA change between consecutive layers: {} -> {} ({v:.4} rad)",
                analysis.layers[i - 1],
                analysis.layers[i]
            );
        }
    }
    for file in &analysis.files {
        println!("wrote {}", file.display());
    }
}

fn short(label: &str) -> String {
    label.chars().take(10).collect()
}
