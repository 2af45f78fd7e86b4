//! The README and the guides stay true: every `qtune …` / `cargo run --release -- …` command in
//! their shell blocks parses with the real command line, every file they name exists, every route
//! their curl lines call is in the OpenAPI document, and the pages generated from the binary
//! (configuration, API reference) are what it generates now. (full/docs_examples.rs runs the
//! README's and the getting-started guide's commands against a real server.)

use std::path::{Path, PathBuf};

use clap::Parser;

const README: &str = include_str!("../../README.md");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page of docs/src, with their paths.
fn pages() -> Vec<(PathBuf, String)> {
    let mut out = vec![(root().join("README.md"), README.to_string())];
    let mut names: Vec<PathBuf> = std::fs::read_dir(root().join("docs/src"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    names.sort();
    for p in names {
        let text = std::fs::read_to_string(&p).unwrap();
        out.push((p, text));
    }
    out
}

fn shell_lines() -> Vec<String> {
    pages()
        .iter()
        .flat_map(|(_, text)| shell_lines_of(text))
        .collect()
}

/// Lines of the ```bash blocks, with `\` continuations joined and comments dropped.
fn shell_lines_of(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        if let Some(info) = line.strip_prefix("```") {
            in_block = !in_block && info.split([' ', ',']).next() == Some("bash");
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
                .take_while(|x| !x.starts_with(['>', ')', '&']))
                .cloned()
                .collect();
            found.push(args);
        }
    }
    found
}

#[test]
fn every_qtune_command_in_the_docs_parses() {
    let mut checked = 0;
    for line in shell_lines() {
        for args in qtune_commands(&line) {
            let argv = std::iter::once("qtune".to_string()).chain(args.iter().cloned());
            if let Err(e) = qtune::cli::Cli::try_parse_from(argv) {
                panic!("this line of the docs does not parse: {line}\n{e}");
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 20,
        "found only {checked} qtune commands in the docs"
    );
}

#[test]
fn the_two_commands_come_first_and_are_what_ci_runs() {
    let lines = shell_lines_of(README);
    assert_eq!(
        words(&lines[0]),
        ["cargo", "run", "--release", "--", "quickstart"]
    );
    assert_eq!(words(&lines[1]), ["./scripts/test.sh"]);
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(ci.lines().any(|l| l.trim() == "./scripts/test.sh"));
}

#[test]
fn files_the_docs_name_exist() {
    let mut checked = 0;
    for (page, text) in pages() {
        for token in text.split(|c: char| c.is_whitespace() || "`()[],\"'".contains(c)) {
            let t = token.trim_end_matches(['.', ':', ';']);
            let looks_like_repo_file = [
                "examples/",
                "scripts/",
                "docker/",
                "tests/",
                "migrations/",
                "openapi/",
                "bench/",
                "web/",
            ]
            .iter()
            .any(|p| t.starts_with(p))
                || (t.starts_with("docker-compose") && t.ends_with(".yml"));
            if looks_like_repo_file && !t.contains('…') && !t.contains('*') && !t.contains('{') {
                assert!(
                    root().join(t).exists(),
                    "{} names {t}, which does not exist",
                    page.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 50, "{checked}");
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
            let Some(rest) = w
                .split_once("127.0.0.1:8080")
                .or_else(|| w.split_once("localhost:8080"))
                .map(|(_, r)| r)
            else {
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
                "the docs call {path}, which is not in openapi/openapi.yaml"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked}");
}

/// The pages generated from the binary are what it generates now (regenerate with
/// `qtune docs PAGE > docs/src/PAGE.md`), and the configuration page holds `qtune serve --help`
/// and `qtune worker --help` exactly as the built binary prints them.
#[test]
fn generated_pages_match_the_binary() {
    use qtune::cli::docs::Page;
    for (page, file) in [
        (Page::Configuration, "configuration.md"),
        (Page::ApiReference, "api-reference.md"),
    ] {
        let committed = std::fs::read_to_string(root().join("docs/src").join(file)).unwrap();
        if committed != page.render() {
            std::fs::write(std::env::temp_dir().join(file), page.render()).unwrap();
        }
        assert!(
            committed == page.render(),
            "docs/src/{file} is out of date: run `cargo run -- docs {} > docs/src/{file}`",
            clap::ValueEnum::to_possible_value(&page)
                .unwrap()
                .get_name()
        );
    }
    let page = std::fs::read_to_string(root().join("docs/src/configuration.md")).unwrap();
    for command in ["serve", "worker"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_qtune"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains("QTUNE_LISTEN"), "{help}");
        let block = format!("## `qtune {command} --help`\n\n```text\n{help}```\n");
        assert!(
            page.contains(&block),
            "docs/src/configuration.md does not hold `qtune {command} --help` as the binary prints it"
        );
    }
}
