//! The layering the architecture promises, checked on the manifests: the platform's library
//! crates never depend on the AI layer (the controller, the workers, their contract, the
//! benchmarks); only the two composition roots, `sedge` and `sedge-edge`, join them.

use std::path::Path;

const AI_CRATES: [&str; 4] = [
    "sedge-ai-controller",
    "sedge-inference-worker",
    "sedge-worker-contract",
    "sedge-benchmarks",
];
const ROOTS: [&str; 2] = ["sedge", "sedge-edge"];

#[test]
fn platform_libraries_do_not_depend_on_the_ai_layer() {
    let platform = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(platform).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .map(|n| n.trim_matches('"').to_string())
            .unwrap();
        if ROOTS.contains(&name.as_str()) {
            continue;
        }
        checked += 1;
        for line in text.lines() {
            let dep = line.split(['.', ' ', '=']).next().unwrap_or_default();
            assert!(
                !AI_CRATES.contains(&dep),
                "{name} ({}) depends on the AI layer's {dep}",
                manifest.display()
            );
        }
    }
    assert!(checked >= 9, "only {checked} platform crates found");
}
