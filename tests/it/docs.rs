//! The README stays true: every `qtune …` / `cargo run --release -- …` command in its shell
//! blocks parses with the real command line, every file it names exists, and every route its curl
//! lines call is in the OpenAPI document. (What the commands do is tested where they are built:
//! quickstart.rs, client.rs, cli.rs, api.rs; the test command is what CI runs.)

use std::path::Path;

use clap::Parser;

const README: &str = include_str!("../../README.md");

/// Lines of the ```bash blocks, with `\` continuations joined and comments dropped.
fn shell_lines() -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in README.lines() {
        if line.starts_with("```") {
            in_block = line.trim() == "```bash";
            continue;
        }
        if !in_block {
            continue;
        }
        let code = strip_comment(line);
        if let Some(head) = code.trim_end().strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(code);
        let full = std::mem::take(&mut pending);
        if !full.trim().is_empty() {
            lines.push(full.trim().to_string());
        }
    }
    lines
}

fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if i == 0 || line[..i].ends_with(' ') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Shell words, honouring single and double quotes (enough for the README).
fn words(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// The qtune invocations in a line: after `qtune`, `target/release/qtune` or `cargo run --release --`.
fn qtune_commands(line: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for segment in line.split(['|', ';']).flat_map(|s| s.split("&&")) {
        let w = words(segment);
        let start = w.iter().enumerate().find_map(|(i, word)| {
            if word == "qtune" || word.ends_with("/qtune") {
                Some(i + 1)
            } else if word == "run" && i > 0 && w[i - 1] == "cargo" {
                let dashes = w[i..].iter().position(|x| x == "--")?;
                let between = &w[i + 1..i + dashes];
                // `cargo run --example X --` runs an example, not qtune
                (!between.iter().any(|x| x == "--example")).then_some(i + dashes + 1)
            } else {
                None
            }
        });
        if let Some(s) = start {
            // stop at a shell redirection or substitution
            let args: Vec<String> = w[s..]
                .iter()
                .take_while(|x| !x.starts_with('>') && !x.starts_with(')'))
                .cloned()
                .collect();
            found.push(args);
        }
    }
    found
}

#[test]
fn every_qtune_command_in_the_readme_parses() {
    let mut checked = 0;
    for line in shell_lines() {
        for args in qtune_commands(&line) {
            let argv = std::iter::once("qtune".to_string()).chain(args.iter().cloned());
            if let Err(e) = qtune::cli::Cli::try_parse_from(argv) {
                panic!("README line does not parse: {line}\n{e}");
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "found only {checked} qtune commands in the README"
    );
}

#[test]
fn the_two_commands_come_first_and_are_what_ci_runs() {
    let lines = shell_lines();
    assert_eq!(
        words(&lines[0]),
        ["cargo", "run", "--release", "--", "quickstart"]
    );
    assert_eq!(words(&lines[1]), ["./scripts/test.sh"]);
    let ci =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run")).unwrap();
    assert!(ci.lines().any(|l| l.trim() == "./scripts/test.sh"));
}

#[test]
fn files_the_readme_names_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for token in README.split(|c: char| c.is_whitespace() || "`()[],".contains(c)) {
        let t = token.trim_end_matches(['.', ':', ';']);
        let looks_like_repo_file = [
            "examples/",
            "scripts/",
            "docker/",
            "tests/",
            "migrations/",
            "openapi/",
        ]
        .iter()
        .any(|p| t.starts_with(p))
            || (t.starts_with("docker-compose") && t.ends_with(".yml"));
        if looks_like_repo_file && !t.contains('…') && !t.contains('*') && !t.contains('{') {
            assert!(
                root.join(t).exists(),
                "README names {t}, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked}");
}

#[test]
fn curl_routes_are_in_the_openapi_document() {
    let doc: serde_yaml::Value = serde_yaml::from_str(qtune::api::OPENAPI_YAML).unwrap();
    let templates: Vec<Vec<String>> = doc["paths"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().split('/').map(str::to_string).collect())
        .collect();
    let mut checked = 0;
    for line in shell_lines().iter().filter(|l| l.contains("curl ")) {
        for w in words(line) {
            let Some(rest) = w.split_once("localhost:8080").map(|(_, r)| r) else {
                continue;
            };
            let path = rest.split('?').next().unwrap();
            let parts: Vec<&str> = path.split('/').collect();
            let known = templates.iter().any(|t| {
                t.len() == parts.len()
                    && t.iter()
                        .zip(&parts)
                        .all(|(a, b)| a == b || (a.starts_with('{') && !b.is_empty()))
            });
            assert!(
                known,
                "README calls {path}, which is not in openapi/openapi.yaml"
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "{checked}");
}
