//! Runs the fuzz targets with seeded mutations of their corpus.
//!
//! ```sh
//! cargo run --release -p migration-fuzz -- [--seconds 60] [--seed N] [TARGET ...]
//! cargo run --release -p migration-fuzz -- --write-corpus   # refresh fuzz/corpus from the built-in seeds
//! ```
//!
//! A panic is a finding: the input is saved under `fuzz/regressions/TARGET-HASH`
//! (the tests replay that directory) and the run fails.

use migration_fuzz::{Rng, TARGETS, mutate, seeds};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The target's checked-in corpus (`--write-corpus` output, which may
/// predate a seed) and every built-in seed not in it.
fn load(target: &str) -> Vec<Vec<u8>> {
    let mut inputs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(corpus_dir().join(target)) {
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        inputs.extend(paths.iter().filter_map(|p| std::fs::read(p).ok()));
    }
    for seed in seeds(target) {
        if !inputs.contains(&seed) {
            inputs.push(seed);
        }
    }
    inputs
}

fn main() -> std::process::ExitCode {
    let mut seconds = 10.0f64;
    let mut seed = 1u64;
    let mut chosen = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).expect("--seed N"),
            "--write-corpus" => {
                for (name, _) in TARGETS {
                    let dir = corpus_dir().join(name);
                    std::fs::create_dir_all(&dir).expect("corpus directory");
                    for (i, input) in seeds(name).iter().enumerate() {
                        std::fs::write(dir.join(format!("seed-{i}")), input).expect("writing a seed");
                    }
                }
                return std::process::ExitCode::SUCCESS;
            }
            name => chosen.push(name.to_owned()),
        }
    }
    // Findings are reported by this driver, not by the default hook.
    std::panic::set_hook(Box::new(|_| {}));
    let targets: Vec<_> = TARGETS
        .iter()
        .filter(|(name, _)| chosen.is_empty() || chosen.iter().any(|c| c == name))
        .collect();
    let budget = Duration::from_secs_f64(seconds / targets.len().max(1) as f64);
    let mut rng = Rng::new(seed);
    for (name, run) in targets {
        let corpus = load(name);
        let started = Instant::now();
        let mut executions = 0u64;
        while started.elapsed() < budget {
            let base = &corpus[rng.next_u64() as usize % corpus.len()];
            let other = &corpus[rng.next_u64() as usize % corpus.len()];
            let input = mutate(&mut rng, base, other);
            executions += 1;
            if std::panic::catch_unwind(|| run(&input)).is_err() {
                let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
                std::fs::create_dir_all(&dir).expect("regressions directory");
                let path = dir.join(format!("{name}-{hash:016x}"));
                std::fs::write(&path, &input).expect("saving the finding");
                let _ = std::panic::take_hook();
                eprintln!(
                    "{name}: a panic after {executions} inputs; input saved to {}",
                    path.display()
                );
                run(&input);
                return std::process::ExitCode::FAILURE;
            }
        }
        eprintln!(
            "{name}: {executions} inputs in {:.1} s, no finding",
            started.elapsed().as_secs_f64()
        );
    }
    std::process::ExitCode::SUCCESS
}
