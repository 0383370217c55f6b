//! Two groups of positions or inputs compared layer by layer
//! ([`dynexec_dsa::groups::compare_groups`]), written as CSV, JSON and a heatmap: what
//! `analyze --by-verdict` and `analyze exits` report.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use dynexec_dsa::groups::{compare_groups, select_trials, GroupConfig, GroupLayer, Null};
use dynexec_dsa::layers::cross_layer_matrices;
use dynexec_dsa::{Dsa, Metric, Trajectories};
use dynexec_plot::heatmap::{write_png, Heatmap};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// How groups are compared.
#[derive(Args, Clone, Debug)]
pub struct GroupArgs {
    /// Positions per trajectory: each compared position is represented by the states of the
    /// WINDOW positions ending at it.
    #[arg(long, default_value_t = 8)]
    pub window: usize,

    /// Relabellings behind each group distance's null (0: no test). Each p is at least
    /// 1 / (permutations + 1), so with L layers tested a layer that differs alone passes the
    /// false-discovery-rate test only with more than 20 L permutations; several together
    /// need fewer.
    #[arg(long, default_value_t = 200)]
    pub permutations: usize,

    /// How the null relabels: `rotate` (along the text, keeping runs of labels and overlapping
    /// windows: right for the positions of one text) or `shuffle` (right for independent
    /// inputs). Default: whichever fits what is compared.
    #[arg(long, value_enum)]
    pub null: Option<NullChoice>,
}

/// `--null`'s values.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum NullChoice {
    Rotate,
    Shuffle,
}

impl From<NullChoice> for Null {
    fn from(choice: NullChoice) -> Self {
        match choice {
            NullChoice::Rotate => Null::Rotate,
            NullChoice::Shuffle => Null::Shuffle,
        }
    }
}

/// One group comparison, as JSON reports it.
#[derive(Serialize)]
pub struct GroupReport {
    /// What group A and group B are.
    pub groups: [String; 2],
    /// Trajectories in each group.
    pub sizes: [usize; 2],
    /// How the null relabelled: `rotate` or `shuffle`.
    pub null: Null,
    /// Per layer: the distances, their nulls and p-values, norms and layer updates.
    pub layers: Vec<GroupLayer>,
    /// Layers where the groups' dynamics differ: DSA q < 0.05 (p adjusted for the false
    /// discovery rate over the layers).
    pub dsa_different_layers: Vec<usize>,
    /// Layers where the groups' mean states differ: centroid q < 0.05.
    pub centroid_different_layers: Vec<usize>,
}

/// Where a comparison's files go and what they are called.
pub struct GroupOutput<'a> {
    /// The analysis folder.
    pub dir: &'a Path,
    /// File stem, e.g. `verdicts-target`.
    pub stem: String,
    /// The heatmap's title.
    pub title: String,
    /// Draw the heatmap.
    pub plots: bool,
}

/// Compares group A (`in_a`) with group B at every layer (`null`: how labels are permuted
/// unless `--null` says otherwise),
/// writes `STEM.csv` and — with plots — `STEM-dsa.png` (DSA between group A at every layer and
/// group B at every layer, each group in its own principal components, so its diagonal is
/// close to, not equal to, the CSV's `dsa_angular`), and returns the report and the files.
pub fn compare_and_write(
    layers: &[(usize, Trajectories)],
    in_a: &[bool],
    names: [&str; 2],
    dsa: &Dsa,
    args: &GroupArgs,
    null: Null,
    components: usize,
    threads: Option<usize>,
    output: &GroupOutput,
) -> Result<(GroupReport, Vec<PathBuf>)> {
    let config = GroupConfig {
        components,
        permutations: args.permutations,
        seed: 0,
        null: args.null.map_or(null, Null::from),
    };
    let rows = compare_groups(layers, in_a, dsa, &config, threads)
        .with_context(|| format!("comparing {} with {}", names[0], names[1]))?;
    let report = GroupReport {
        groups: names.map(str::to_string),
        sizes: [
            in_a.iter().filter(|&&a| a).count(),
            in_a.iter().filter(|&&a| !a).count(),
        ],
        null: config.null,
        dsa_different_layers: rows
            .iter()
            .filter(|r| r.dsa_q < 0.05)
            .map(|r| r.layer)
            .collect(),
        centroid_different_layers: rows
            .iter()
            .filter(|r| r.centroid_q < 0.05)
            .map(|r| r.layer)
            .collect(),
        layers: rows,
    };
    let mut files = vec![output.dir.join(format!("{}.csv", output.stem))];
    write_rows(&files[0], &report.layers)?;
    if output.plots {
        let split = |group: bool| -> Result<Vec<Trajectories>> {
            layers
                .iter()
                .map(|(_, t)| Ok(select_trials(t, in_a, group)?))
                .collect()
        };
        let cross = cross_layer_matrices(
            &split(true)?,
            &split(false)?,
            dsa,
            &[Metric::DsaAngular],
            components,
            threads,
        )
        .context("DSA between the groups' layers")?;
        let labels: Vec<String> = layers.iter().map(|(l, _)| l.to_string()).collect();
        let png = output.dir.join(format!("{}-dsa.png", output.stem));
        let (rows_axis, columns_axis) =
            (format!("{} layer", names[0]), format!("{} layer", names[1]));
        write_png(
            &Heatmap {
                title: &output.title,
                row_labels: &labels,
                column_labels: &labels,
                row_axis: &rows_axis,
                column_axis: &columns_axis,
                values: &cross[0].values,
            },
            &png,
        )?;
        files.push(png);
    }
    Ok((report, files))
}

/// Stacks the trials of several traces' windows (the same layers in the same order).
pub fn stack_trials(parts: Vec<Vec<(usize, Trajectories)>>) -> Result<Vec<(usize, Trajectories)>> {
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else {
        return Ok(Vec::new());
    };
    let mut stacked: Vec<(usize, usize, Vec<f64>, usize, usize)> = first
        .into_iter()
        .map(|(l, t)| (l, t.trials(), t.data().to_vec(), t.time(), t.features()))
        .collect();
    for part in parts {
        anyhow::ensure!(
            part.len() == stacked.len(),
            "traces with different layers cannot be stacked"
        );
        for (slot, (layer, t)) in stacked.iter_mut().zip(part) {
            anyhow::ensure!(
                slot.0 == layer && slot.3 == t.time() && slot.4 == t.features(),
                "traces with different layers or shapes cannot be stacked"
            );
            slot.1 += t.trials();
            slot.2.extend_from_slice(t.data());
        }
    }
    stacked
        .into_iter()
        .map(|(layer, trials, data, time, features)| {
            Ok((layer, Trajectories::from_3d(trials, time, features, data)?))
        })
        .collect()
}

fn write_rows(path: &Path, rows: &[GroupLayer]) -> Result<()> {
    let mut text = String::from("layer,dsa_angular,dsa_null,dsa_p,dsa_q,dsa_z,centroid_cosine,centroid_null,centroid_p,centroid_q,norm_a,norm_b,update_a,update_b\n");
    for r in rows {
        text.push_str(&format!(
            "{},{:.6},{:.6},{:.4},{:.4},{:.3},{:.6},{:.6},{:.4},{:.4},{:.4},{:.4},{:.6},{:.6}\n",
            r.layer,
            r.dsa_angular,
            r.dsa_null,
            r.dsa_p,
            r.dsa_q,
            r.dsa_z,
            r.centroid_cosine,
            r.centroid_null,
            r.centroid_p,
            r.centroid_q,
            r.norm_a,
            r.norm_b,
            r.update_a,
            r.update_b
        ));
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A table of the comparison on stdout.
pub fn print_report(title: &str, report: &GroupReport) {
    println!(
        "{title}: {} ({}) vs {} ({})",
        report.groups[0], report.sizes[0], report.groups[1], report.sizes[1]
    );
    println!(
        "{:>6} {:>9} {:>9} {:>6} {:>6} {:>6} {:>9} {:>9} {:>6} {:>9} {:>9}",
        "layer", "dsa", "dsa null", "z", "p", "q", "centroid", "null", "q", "update A", "update B"
    );
    for r in &report.layers {
        println!(
            "{:>6} {:>9.4} {:>9.4} {:>6.2} {:>6.3} {:>6.3} {:>9.4} {:>9.4} {:>6.3} {:>9.4} {:>9.4}",
            r.layer,
            r.dsa_angular,
            r.dsa_null,
            r.dsa_z,
            r.dsa_p,
            r.dsa_q,
            r.centroid_cosine,
            r.centroid_null,
            r.centroid_q,
            r.update_a,
            r.update_b
        );
    }
    println!(
        "layers whose dynamics differ (DSA q < 0.05): {:?}; whose mean states differ (centroid q < 0.05): {:?}",
        report.dsa_different_layers, report.centroid_different_layers
    );
}
