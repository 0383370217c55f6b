//! Labelled data sets: text from JSONL or CSV (`text`, `label`), images from idx files.

use candle_core::{Device, Tensor};
use dynexec_core::{Error, Result, Setting};
use std::path::{Path, PathBuf};

/// Labelled inputs: sentences or images.
#[derive(Debug, Clone)]
pub enum Examples {
    /// One sentence per example.
    Text(Vec<String>),
    /// `(count, height, width)` u8 pixels.
    Images(Tensor),
}

/// A labelled split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The inputs, one per label.
    pub inputs: Examples,
    /// Label names as written in the file (text) or class numbers (idx).
    pub labels: Vec<String>,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Label indices into `names`; a label not among them is an error naming it.
    pub fn label_indices(&self, names: &[String]) -> Result<Vec<usize>> {
        self.labels
            .iter()
            .map(|l| {
                names.iter().position(|n| n == l).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "label `{l}` is not one of the model's labels ({})",
                        names.join(", ")
                    ))
                })
            })
            .collect()
    }

    /// Class numbers (idx labels `0`, `1`, ...) replaced by `names[number]`; labels that
    /// already are names, or are not numbers, stay as they are.
    pub fn name_classes(mut self, names: &[String]) -> Self {
        let numbered = self
            .labels
            .iter()
            .all(|l| !names.contains(l) && l.parse::<usize>().is_ok_and(|n| n < names.len()));
        if numbered {
            for label in &mut self.labels {
                if let Ok(n) = label.parse::<usize>() {
                    *label = names[n].clone();
                }
            }
        }
        self
    }

    /// The inputs at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Result<Examples> {
        Ok(match &self.inputs {
            Examples::Text(texts) => {
                Examples::Text(indices.iter().map(|&i| texts[i].clone()).collect())
            }
            Examples::Images(images) => {
                let ids: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
                let ids = Tensor::from_vec(ids, indices.len(), images.device())?;
                Examples::Images(images.index_select(&ids, 0)?)
            }
        })
    }

    /// The first `count` examples (all if fewer).
    pub fn take(&self, count: usize) -> Result<Self> {
        let n = self.len().min(count);
        Ok(Self {
            inputs: self.select(&(0..n).collect::<Vec<_>>())?,
            labels: self.labels[..n].to_vec(),
        })
    }
}

/// Sorted distinct labels of a split (the label set of a text task).
pub fn distinct_labels(data: &Dataset) -> Vec<String> {
    let mut labels = data.labels.clone();
    labels.sort();
    labels.dedup();
    labels
}

/// Reads `text,label` examples from a `.jsonl` file (objects with `text` and `label`) or a
/// `.csv` file with a header naming `text` and `label` columns.
pub fn read_text(path: &Path) -> Result<Dataset> {
    let content = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |line: usize, why: String| {
        Error::InvalidArgument(format!("{}:{line}: {why}", path.display()))
    };
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    let is_csv = path.extension().is_some_and(|e| e == "csv");
    if is_csv {
        let mut lines = content.lines().enumerate();
        let header = lines
            .next()
            .map(|(_, h)| csv_fields(h))
            .ok_or_else(|| bad(1, "empty CSV file".into()))?;
        let column = |name: &str| {
            header.iter().position(|h| h.trim() == name).ok_or_else(|| {
                bad(
                    1,
                    format!("the header has no `{name}` column (need text and label)"),
                )
            })
        };
        let (text_col, label_col) = (column("text")?, column("label")?);
        for (n, line) in lines.filter(|(_, l)| !l.trim().is_empty()) {
            let fields = csv_fields(line);
            match (fields.get(text_col), fields.get(label_col)) {
                (Some(t), Some(l)) => {
                    texts.push(t.clone());
                    labels.push(l.trim().to_string());
                }
                _ => return Err(bad(n + 1, "too few fields".into())),
            }
        }
    } else {
        for (n, line) in content.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| bad(n + 1, format!("not a JSON object: {e}")))?;
            let text = value["text"]
                .as_str()
                .ok_or_else(|| bad(n + 1, "no string field `text`".into()))?;
            let label = match &value["label"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(x) => x.to_string(),
                _ => return Err(bad(n + 1, "no string or number field `label`".into())),
            };
            texts.push(text.to_string());
            labels.push(label);
        }
    }
    if texts.is_empty() {
        return Err(bad(0, "no examples".into()));
    }
    Ok(Dataset {
        inputs: Examples::Text(texts),
        labels,
    })
}

/// Splits one CSV line, honouring double quotes (`""` is a literal quote).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                if let Some(f) = fields.last_mut() {
                    f.push('"');
                }
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            (c, _) => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

/// Reads an idx3 image file and its idx1 label file (the MNIST format).
pub fn read_idx(images: &Path, labels: &Path, device: &Device) -> Result<Dataset> {
    let image_bytes = std::fs::read(images).map_err(|e| Error::io(images, e))?;
    let label_bytes = std::fs::read(labels).map_err(|e| Error::io(labels, e))?;
    let bad = |path: &Path, why: &str| {
        Error::InvalidArgument(format!("{} is not an idx file: {why}", path.display()))
    };
    let be = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    if image_bytes.len() < 16 || be(&image_bytes, 0) != 0x0803 {
        return Err(bad(
            images,
            "expected the idx3 (u8 images) magic 0x00000803",
        ));
    }
    if label_bytes.len() < 8 || be(&label_bytes, 0) != 0x0801 {
        return Err(bad(
            labels,
            "expected the idx1 (u8 labels) magic 0x00000801",
        ));
    }
    let (count, rows, cols) = (
        be(&image_bytes, 4) as usize,
        be(&image_bytes, 8) as usize,
        be(&image_bytes, 12) as usize,
    );
    if image_bytes.len() != 16 + count * rows * cols {
        return Err(bad(
            images,
            "its size does not match its header (truncated?)",
        ));
    }
    if be(&label_bytes, 4) as usize != count || label_bytes.len() != 8 + count {
        return Err(Error::InvalidArgument(format!(
            "{} and {} hold different numbers of examples",
            images.display(),
            labels.display()
        )));
    }
    let pixels = Tensor::from_vec(image_bytes[16..].to_vec(), (count, rows, cols), device)?;
    Ok(Dataset {
        inputs: Examples::Images(pixels),
        labels: label_bytes[8..].iter().map(|l| l.to_string()).collect(),
    })
}

/// A task's three splits.
#[derive(Debug)]
pub struct Splits {
    /// Examples the weights are trained on.
    pub train: Dataset,
    /// Examples for per-epoch reports and policy calibration.
    pub val: Dataset,
    /// Examples held out for the final numbers.
    pub test: Dataset,
    /// How the splits were made, for the card.
    pub source: String,
}

/// The splits in `dir` ([`read_splits`]) with class numbers named as `labels` (the names
/// an exit model's card lists).
pub fn read_named_splits(
    dir: &Path,
    val_size: usize,
    labels: &[String],
    device: &Device,
) -> Result<Splits> {
    let splits = read_splits(dir, val_size, device)?;
    Ok(Splits {
        train: splits.train.name_classes(labels),
        val: splits.val.name_classes(labels),
        test: splits.test.name_classes(labels),
        source: splits.source,
    })
}

/// The splits in `dir`: `{train,val,test}.jsonl` (or `.csv`) for text, or the four
/// MNIST-style idx files, whose last `val_size` training images are the validation split.
pub fn read_splits(dir: &Path, val_size: usize, device: &Device) -> Result<Splits> {
    let text_split = |name: &str| -> Option<PathBuf> {
        ["jsonl", "csv"]
            .iter()
            .map(|ext| dir.join(format!("{name}.{ext}")))
            .find(|p| p.exists())
    };
    if let (Some(train), Some(val), Some(test)) =
        (text_split("train"), text_split("val"), text_split("test"))
    {
        return Ok(Splits {
            train: read_text(&train)?,
            val: read_text(&val)?,
            test: read_text(&test)?,
            source: format!("{}/{{train,val,test}}", dir.display()),
        });
    }
    let idx = |name: &str| dir.join(name);
    if !idx("train-images-idx3-ubyte").exists() {
        return Err(Error::InvalidArgument(format!(
            "{} holds neither train/val/test .jsonl or .csv files nor MNIST-style idx files \
             (train-images-idx3-ubyte, ...): pass a data set's name instead (`--data reviews`, \
             `--data fashion-mnist`), or pull one with `dynexec data pull NAME`",
            dir.display()
        )));
    }
    let full = read_idx(
        &idx("train-images-idx3-ubyte"),
        &idx("train-labels-idx1-ubyte"),
        device,
    )?;
    let test = read_idx(
        &idx("t10k-images-idx3-ubyte"),
        &idx("t10k-labels-idx1-ubyte"),
        device,
    )?;
    if val_size == 0 || val_size >= full.len() {
        return Err(Error::setting(
            Setting::ValidationSize,
            format!(
                "{val_size} must be between 1 and the {} training images",
                full.len()
            ),
        ));
    }
    let cut = full.len() - val_size;
    let split = |range: std::ops::Range<usize>| -> Result<Dataset> {
        Ok(Dataset {
            inputs: full.select(&range.clone().collect::<Vec<_>>())?,
            labels: full.labels[range].to_vec(),
        })
    };
    Ok(Splits {
        train: split(0..cut)?,
        val: split(cut..full.len())?,
        test,
        source: format!(
            "{}: train = first {cut} training images, val = last {val_size}, test = t10k",
            dir.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_and_csv_read_the_same_examples() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("a.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"Good, fun.\", \"label\": \"fresh\"}\n\n{\"text\": \"Dull\", \"label\": 0}\n",
        )
        .unwrap();
        let csv = dir.path().join("a.csv");
        std::fs::write(&csv, "label,text\nfresh,\"Good, fun.\"\n0,Dull\n").unwrap();
        for path in [jsonl, csv] {
            let d = read_text(&path).unwrap();
            let Examples::Text(texts) = &d.inputs else {
                panic!()
            };
            assert_eq!(texts, &["Good, fun.", "Dull"]);
            assert_eq!(d.labels, ["fresh", "0"]);
        }
        assert_eq!(csv_fields(r#"a,"say ""hi""",c"#), ["a", "say \"hi\"", "c"]);
    }

    #[test]
    fn bad_files_name_the_line_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "{\"text\": \"x\", \"label\": \"a\"}\nnot json\n").unwrap();
        let err = read_text(&path).unwrap_err().to_string();
        assert!(
            err.contains("bad.jsonl:2") && err.contains("not a JSON object"),
            "{err}"
        );
        let path = dir.path().join("bad.csv");
        std::fs::write(&path, "sentence,label\nx,a\n").unwrap();
        let err = read_text(&path).unwrap_err().to_string();
        assert!(err.contains("no `text` column"), "{err}");
        let err = read_splits(dir.path(), 10, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dynexec data pull"), "{err}");
    }

    #[test]
    fn idx_files_are_checked_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("i");
        let labels = dir.path().join("l");
        let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        bytes.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        std::fs::write(&images, &bytes).unwrap();
        std::fs::write(&labels, [0, 0, 8, 1, 0, 0, 0, 2, 9, 3]).unwrap();
        let d = read_idx(&images, &labels, &Device::Cpu).unwrap();
        assert_eq!(d.labels, ["9", "3"]);
        let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        assert_eq!(d.clone().name_classes(&names).labels, ["c9", "c3"]);
        let Examples::Images(px) = &d.inputs else {
            panic!()
        };
        assert_eq!(px.dims(), &[2, 2, 2]);
        std::fs::write(&images, &bytes[..20]).unwrap();
        let err = read_idx(&images, &labels, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
