//! Sedna-compatible dataset index files.
//!
//! * `txt`: one sample per non-empty line, `relative/path [label]`, fields separated by white space.
//! * `csv`: a header row, then one row per sample. The path column is the one named `image`, `path`,
//!   `url`, `file` or `x` (else the first column); the label column is `label` or `y` (optional).
//!
//! Relative paths are resolved against the index file's directory (Sedna's examples rely on this,
//! and Sedna issue #35 is what happens when a tool resolves them elsewhere).

use std::path::{Path, PathBuf};

use crate::DatasetError;

/// The two index formats Sedna's `Dataset.spec.format` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexFormat {
    /// Whitespace-separated `path label` lines.
    Txt,
    /// Comma-separated values with a header row.
    Csv,
}

impl IndexFormat {
    /// Parses Sedna's format string (`txt` or `csv`, any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "txt" => Some(IndexFormat::Txt),
            "csv" => Some(IndexFormat::Csv),
            _ => None,
        }
    }

    /// The format implied by a file name: `.csv` is CSV, anything else is txt.
    pub fn from_path(path: &Path) -> Self {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        {
            IndexFormat::Csv
        } else {
            IndexFormat::Txt
        }
    }
}

/// One sample listed by an index file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The sample's path, resolved against the index file's directory.
    pub path: PathBuf,
    /// Its label, when the index gives one.
    pub label: Option<u32>,
}

fn resolve(base: &Path, raw: &str) -> PathBuf {
    let p = Path::new(raw);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn parse_label(path: &Path, line: usize, raw: &str) -> Result<u32, DatasetError> {
    raw.trim()
        .parse::<u32>()
        .map_err(|_| DatasetError::BadIndexLine {
            path: path.to_path_buf(),
            line,
            message: format!("label {raw:?} is not a non-negative integer"),
        })
}

/// Parses index text; `path` locates relative sample paths and names the file in errors.
pub fn parse(
    text: &str,
    path: &Path,
    format: IndexFormat,
) -> Result<Vec<IndexEntry>, DatasetError> {
    let base = path.parent().unwrap_or(Path::new("."));
    match format {
        IndexFormat::Txt => parse_txt(text, path, base),
        IndexFormat::Csv => parse_csv(text, path, base),
    }
}

fn parse_txt(text: &str, path: &Path, base: &Path) -> Result<Vec<IndexEntry>, DatasetError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(sample) = fields.next() else {
            continue;
        };
        let label = fields
            .next()
            .map(|l| parse_label(path, i + 1, l))
            .transpose()?;
        out.push(IndexEntry {
            path: resolve(base, sample),
            label,
        });
    }
    Ok(out)
}

fn parse_csv(text: &str, path: &Path, base: &Path) -> Result<Vec<IndexEntry>, DatasetError> {
    let bad = |line: usize, message: String| DatasetError::BadIndexLine {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| bad(1, format!("bad header: {e}")))?
        .clone();
    if headers.is_empty() || headers.iter().all(str::is_empty) {
        return Err(bad(
            1,
            "empty header row; expected e.g. `image,label`".into(),
        ));
    }
    let find = |names: &[&str]| {
        headers
            .iter()
            .position(|h| names.iter().any(|n| h.eq_ignore_ascii_case(n)))
    };
    let path_col = find(&["image", "path", "url", "file", "x"]).unwrap_or(0);
    let label_col = find(&["label", "y"]);
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| bad(line, e.to_string()))?;
        let sample = record
            .get(path_col)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                bad(
                    line,
                    format!("no value in path column {:?}", &headers[path_col]),
                )
            })?;
        let label = match label_col.and_then(|c| record.get(c)) {
            Some(l) if !l.is_empty() => Some(parse_label(path, line, l)?),
            _ => None,
        };
        out.push(IndexEntry {
            path: resolve(base, sample),
            label,
        });
    }
    Ok(out)
}

/// Reads an index file, taking the format from its extension (`.csv`, else txt).
pub fn read(path: impl AsRef<Path>) -> Result<Vec<IndexEntry>, DatasetError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| DatasetError::io(path, e))?;
    parse(&text, path, IndexFormat::from_path(path))
}

/// Renders entries as index text, writing paths relative to `base` where they lie under it.
pub fn render(entries: &[IndexEntry], base: &Path, format: IndexFormat) -> String {
    let mut out = String::new();
    if format == IndexFormat::Csv {
        out.push_str("image,label\n");
    }
    let sep = if format == IndexFormat::Csv { ',' } else { ' ' };
    for e in entries {
        let rel = e.path.strip_prefix(base).unwrap_or(&e.path);
        out.push_str(&rel.to_string_lossy());
        match e.label {
            Some(l) => {
                out.push(sep);
                out.push_str(&l.to_string());
            }
            // A CSV row keeps every column; the empty label field reads back as no label.
            None if format == IndexFormat::Csv => out.push(sep),
            None => {}
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_resolves_relative_to_the_index() {
        let entries = parse(
            "a/1.png 3\n\n  /abs/2.png 0 extra\nlonely.png\n",
            Path::new("/data/idx.txt"),
            IndexFormat::Txt,
        )
        .unwrap();
        assert_eq!(
            entries,
            vec![
                IndexEntry {
                    path: "/data/a/1.png".into(),
                    label: Some(3)
                },
                IndexEntry {
                    path: "/abs/2.png".into(),
                    label: Some(0)
                },
                IndexEntry {
                    path: "/data/lonely.png".into(),
                    label: None
                },
            ]
        );
    }

    #[test]
    fn txt_bad_label_names_line_and_value() {
        let err = parse("a.png 1\nb.png cat\n", Path::new("i.txt"), IndexFormat::Txt).unwrap_err();
        assert_eq!(
            err.to_string(),
            "i.txt:2: label \"cat\" is not a non-negative integer"
        );
    }

    #[test]
    fn csv_finds_columns_by_name() {
        let text = "label,image\n4,x/1.png\n,x/2.png\n";
        let entries = parse(text, Path::new("/d/i.csv"), IndexFormat::Csv).unwrap();
        assert_eq!(
            entries[0],
            IndexEntry {
                path: "/d/x/1.png".into(),
                label: Some(4)
            }
        );
        assert_eq!(entries[1].label, None);
    }

    #[test]
    fn csv_errors_are_located() {
        let err = parse(
            "image,label\na.png,1\nb.png,-2\n",
            Path::new("i.csv"),
            IndexFormat::Csv,
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("i.csv:3: label \"-2\""),
            "{err}"
        );
        let err = parse(
            "image,label\na.png,1,9\n",
            Path::new("i.csv"),
            IndexFormat::Csv,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("i.csv:2:"), "{err}");
        let err = parse("", Path::new("i.csv"), IndexFormat::Csv).unwrap_err();
        assert!(err.to_string().contains("header"), "{err}");
        let err = parse("image,label\n,3\n", Path::new("i.csv"), IndexFormat::Csv).unwrap_err();
        assert!(err.to_string().contains("no value in path column"), "{err}");
    }

    #[test]
    fn garbage_never_panics() {
        let junk = [
            "\u{0}\u{1}",
            "a b c d e",
            "\"unterminated,1\n",
            ",,,,\n,,",
            "x 99999999999999999999",
        ];
        for text in junk {
            for fmt in [IndexFormat::Txt, IndexFormat::Csv] {
                let _ = parse(text, Path::new("j"), fmt);
            }
        }
    }

    #[test]
    fn render_then_parse_round_trips() {
        let entries = vec![
            IndexEntry {
                path: "/b/img/0.png".into(),
                label: Some(9),
            },
            IndexEntry {
                path: "/b/img/1.png".into(),
                label: None,
            },
        ];
        for fmt in [IndexFormat::Txt, IndexFormat::Csv] {
            let text = render(&entries, Path::new("/b"), fmt);
            assert!(text.contains("img/0.png"));
            assert_eq!(parse(&text, Path::new("/b/index"), fmt).unwrap(), entries);
        }
    }

    #[test]
    fn format_names_follow_sedna() {
        assert_eq!(IndexFormat::parse("TXT"), Some(IndexFormat::Txt));
        assert_eq!(IndexFormat::parse("csv"), Some(IndexFormat::Csv));
        assert_eq!(IndexFormat::parse("json"), None);
    }
}
