//! Index files under mutated input: Sedna's txt and csv indexes parse or fail with the file
//! named, never panic.

use std::path::Path;

use sedge_datasets::index::{self, IndexFormat};

#[test]
fn index_files() {
    let txt = b"images/0.png 9\nimages/1.png 2\n# comment\n\nimages/2.png\n";
    let csv = b"image,label\nimages/0.png,9\n\"images/1 a.png\",2\n";
    let path = Path::new("/data/train/index.txt");
    let stats = sedge_testkit::fuzz::run(&[txt, csv], 20_000, |b| {
        let text = String::from_utf8_lossy(b);
        let a = index::parse(&text, path, IndexFormat::Txt);
        let c = index::parse(&text, path, IndexFormat::Csv);
        if let Err(e) = &a {
            assert!(e.to_string().contains("index.txt"), "{e}");
        }
        a.is_ok() || c.is_ok()
    });
    eprintln!("{stats:?}");
    assert!(stats.accepted > 0, "{stats:?}");
}
