//! The Hugging Face path up to the network boundary: a prepared offline hub cache serves
//! both manifest pulls and `hf:` references, and an unreachable hub is a clear error.

use dynexec_hub::manifest::Manifest;
use dynexec_hub::{HfHub, Hub};

/// Lays out `<hub>/models--ORG--REPO/{refs/main, snapshots/<commit>/FILE}` as hf-hub does.
fn prepare_hub_cache(hub_dir: &std::path::Path, repo: &str, files: &[(&str, &[u8])]) {
    let repo_dir = hub_dir.join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for (name, bytes) in files {
        std::fs::write(snapshot.join(name), bytes).unwrap();
    }
}

fn unreachable_hub(cache_dir: std::path::PathBuf) -> HfHub {
    // Port 9 on loopback: nothing listens, so any download attempt fails at once.
    HfHub {
        cache_dir,
        endpoint: Some("http://127.0.0.1:9".to_string()),
    }
}

#[test]
fn manifest_pull_is_served_from_a_prepared_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let hub_dir = tmp.path().join("hf/hub");
    prepare_hub_cache(&hub_dir, "org/tiny", &[("w.bin", b"weights")]);
    let real_sha = dynexec_hub::sha256_file(
        &hub_dir.join("models--org--tiny/snapshots/0123456789abcdef0123456789abcdef01234567/w.bin"),
    )
    .unwrap();
    let manifest = Manifest::parse(
        &format!(
            r#"
            [[model]]
            name = "tiny"
            architecture = "llama"
            format = "gguf"
            license = "MIT"
            file = [{{ path = "w.bin", sha256 = "{real_sha}", bytes = 7 }}]
            source = [{{ hf = "org/tiny" }}, {{ local = "nowhere" }}]
            "#
        ),
        "test",
        tmp.path(),
    )
    .unwrap();
    let mut hub = Hub::new(manifest, tmp.path().join("cache"));
    hub.progress = false;
    hub.hf = unreachable_hub(hub_dir);
    let pulled = hub.pull("tiny").unwrap();
    assert_eq!(pulled.source.as_deref(), Some("hf:org/tiny@main"));
    assert_eq!(std::fs::read(&pulled.files.files[0]).unwrap(), b"weights");
}

#[test]
fn hf_references_resolve_from_the_cache_and_fail_clearly_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let hub_dir = tmp.path().join("hf/hub");
    prepare_hub_cache(
        &hub_dir,
        "org/dense",
        &[
            ("config.json", b"{}"),
            ("tokenizer.json", b"{}"),
            ("model.safetensors", b""),
        ],
    );
    prepare_hub_cache(&hub_dir, "org/quant", &[("m.Q8_0.gguf", b"GGUF")]);
    let manifest = Manifest::parse("", "test", tmp.path()).unwrap();
    let mut hub = Hub::new(manifest, tmp.path().join("cache"));
    hub.progress = false;
    hub.hf = unreachable_hub(hub_dir);

    let dense = hub.resolve("hf:org/dense").unwrap();
    assert!(dense.find("config.json").is_some() && dense.find(".safetensors").is_some());
    let quant = hub.resolve("hf:org/quant:m.Q8_0.gguf").unwrap();
    assert!(quant.find(".gguf").is_some());

    // Not in the cache: hf-hub goes to the (unreachable) network and the error says so.
    let err = hub
        .resolve("hf:org/absent:model.gguf")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hub download of org/absent/model.gguf failed"),
        "{err}"
    );
    assert!(err.contains("HF_ENDPOINT"), "{err}");
}
