//! The README and docs/ stay navigable: every relative link points at a file in the
//! repository (and a `#fragment` at a heading of it), and no paragraph is written twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    pages
}

/// GitHub's anchor for a heading: lower case, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The targets of `[text](target)` links, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let tail = &rest[at + 2..];
            let Some(end) = tail.find(')') else { break };
            out.push(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    out
}

#[test]
fn relative_links_resolve() {
    let mut dead = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !target.exists() {
                dead.push(format!("{}: {link}", page.display()));
                continue;
            }
            if !fragment.is_empty() && target.extension().is_some_and(|e| e == "md") {
                let headings = std::fs::read_to_string(&target).unwrap();
                let found = headings
                    .lines()
                    .filter_map(|l| {
                        l.trim_start_matches('#')
                            .strip_prefix(' ')
                            .filter(|_| l.starts_with('#'))
                    })
                    .any(|h| anchor(h) == fragment);
                if !found {
                    dead.push(format!("{}: {link} (no such heading)", page.display()));
                }
            }
        }
    }
    assert!(dead.is_empty(), "dead links:\n{}", dead.join("\n"));
}

#[test]
fn no_paragraph_is_written_twice() {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut repeated = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for paragraph in text.split("\n\n") {
            let normalized = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
            // Short lines (headings, one-line commands shown on several pages) may repeat.
            if normalized.len() < 160 || normalized.starts_with('|') {
                continue;
            }
            let here = page.display().to_string();
            if let Some(first) = seen.insert(normalized.clone(), here.clone()) {
                repeated.push(format!("{first} and {here}: {}", &normalized[..80]));
            }
        }
    }
    assert!(
        repeated.is_empty(),
        "repeated paragraphs:\n{}",
        repeated.join("\n")
    );
}
