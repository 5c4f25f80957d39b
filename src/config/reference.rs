//! The configuration, described from the code: `skyline config reference` (the text of
//! `docs/configuration.md`), `skyline config example ROLE` and `skyline config check FILE`.
//!
//! A setting that has a flag is described by the flag's clap definition: its help, its
//! `SKYLINE_*` variable, its default. Every key of a role's file is listed in that role's table
//! of [`Section`]s, next to its parser ([`super::AGENT_FILE`], `gateway::config::FILE`,
//! `bridge::config::FILE`), with the flag that also sets it. Tests hold each table to its
//! parser both ways: every key the parser accepts is in the table (the parser itself is asked,
//! through the error it gives for an unknown key), and the example written from the table, every
//! key at its default, resolves to the same settings as no file at all. `config check` runs the
//! role's own `resolve`, so it cannot disagree with a start.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use super::ConfigError;

/// One table of a role's config file.
pub struct Section {
    /// The table's header: `node`; `service[]`, an array of tables (`[[service]]`);
    /// `routes.<service>`, one table per name.
    pub table: &'static str,
    /// The name the example puts in place of the header's `<...>` (`giphy`).
    pub sample: &'static str,
    /// What the table is for.
    pub doc: &'static str,
    /// For a per-name table whose keys default to another table's values: that table.
    pub defaults_from: Option<&'static str>,
    pub keys: &'static [FileKey],
}

/// One key of a section.
pub struct FileKey {
    /// The key within its table; dotted for an inline table (`outlier.max_ejection`), `[]` for
    /// the fields of an array's elements (`tiers[].select`, documented, not written alone).
    pub key: &'static str,
    /// The clap id of the flag that sets it too (the field's name in the role's `*Args`).
    pub flag: Option<&'static str>,
    /// The type of the value, with its unit.
    pub ty: &'static str,
    pub value: Value,
    /// What the key does; empty when a flag sets it too, whose help says it.
    pub doc: &'static str,
}

/// A key's default, and what the example writes.
pub enum Value {
    /// The default, as TOML: the example writes `key = <default>`.
    Default(&'static str),
    /// No default that TOML can write: `default` says what applies (empty: the flag's help
    /// says it); the example writes `# key = <toml>`.
    Example {
        toml: &'static str,
        default: &'static str,
    },
}

/// How durations are written, in every role and every key.
pub const DURATION: &str = "duration (`500ms`, `3s`, `5m`, `1h`)";

/// A role that reads a config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Agent,
    Gateway,
    Bridge,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Agent, Role::Gateway, Role::Bridge];

    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Gateway => "gateway",
            Role::Bridge => "bridge",
        }
    }

    /// The role's file table.
    pub fn sections(self) -> &'static [Section] {
        match self {
            Role::Agent => super::AGENT_FILE,
            Role::Gateway => crate::gateway::config::FILE,
            Role::Bridge => crate::bridge::config::FILE,
        }
    }

    /// Loads `file` exactly as the role does at start (its own `resolve`), without flags or
    /// variables.
    pub fn check(self, file: PathBuf) -> Result<(), ConfigError> {
        let config = Some(file);
        match self {
            Role::Agent => super::AgentArgs {
                config,
                ..Default::default()
            }
            .resolve()
            .map(drop),
            Role::Gateway => crate::gateway::config::GatewayArgs {
                config,
                ..Default::default()
            }
            .resolve()
            .map(drop),
            Role::Bridge => crate::bridge::config::BridgeArgs {
                config,
                ..Default::default()
            }
            .resolve()
            .map(drop),
        }
    }
}

/// `skyline config`.
#[derive(clap::Args, Clone, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum ConfigCommand {
    /// Check a config file as the role would at start: prints "ok" (exit 0), or the error with
    /// file, line and key (exit 1). Flags and SKYLINE_* variables are not read.
    Check {
        /// The TOML file
        file: PathBuf,
        /// The role that reads the file
        #[arg(long, value_enum, default_value = "agent")]
        role: Role,
    },
    /// Print a commented config file for a role, every key at its default
    Example {
        #[arg(value_enum)]
        role: Role,
    },
    /// Print the reference of every setting of every role in Markdown (docs/configuration.md)
    Reference,
}

/// Runs `skyline config ...`; `cli` is the whole command line's definition.
pub fn run(
    args: ConfigArgs,
    cli: &clap::Command,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> ExitCode {
    let written = match args.command {
        ConfigCommand::Check { file, role } => match role.check(file) {
            Ok(()) => writeln!(out, "ok"),
            Err(e) => {
                let _ = writeln!(err, "{e}");
                return ExitCode::FAILURE;
            }
        },
        ConfigCommand::Example { role } => out.write_all(example(cli, role).as_bytes()),
        ConfigCommand::Reference => out.write_all(reference(cli).as_bytes()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

// === The reference ===

/// The roles in the order the reference shows them; agent, gateway and bridge read a file.
const ROLES: [(&str, Option<Role>); 5] = [
    ("agent", Some(Role::Agent)),
    ("gateway", Some(Role::Gateway)),
    ("bridge", Some(Role::Bridge)),
    ("registry", None),
    ("up", None),
];

/// `docs/configuration.md`.
pub fn reference(cli: &clap::Command) -> String {
    let mut md = String::new();
    let _ = write!(
        md,
        "# Configuration reference\n\n\
         <!-- Generated by `skyline config reference` from the code: the flags' definitions and \
         each role's table of file keys. Do not edit: run \
         `cargo run -- config reference > docs/configuration.md`. -->\n\n\
         Every setting of a role is a flag and a `SKYLINE_*` variable; the settings of `agent`, \
         `gateway` and `bridge` are also keys of the TOML file given with `--config` (many keys \
         are only in the file). A flag beats a variable, and a variable beats the file. \
         `skyline config example ROLE` prints a file with every key at its default, and \
         `skyline config check FILE --role ROLE` checks a file as the role would at start.\n\n\
         Durations are written as a number and a unit, `ns`, `us`, `ms`, `s`, `m` or `h`, and \
         may be combined: `500ms`, `3s`, `1m30s`, `1h`. Addresses are `ip:port`; a listener \
         may also be `off`.\n\n\
         ## Every role\n\n"
    );
    flag_table(&mut md, cli, None);
    md.push_str(
        "\nThe log level is read from `SKYLINE_LOG` (`info` by default; a `tracing` filter such \
         as `debug` or `skyline=debug,hyper=info`).\n",
    );
    for (name, role) in ROLES {
        let Some(command) = cli.find_subcommand(name) else {
            continue;
        };
        let about = command
            .get_about()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let _ = write!(md, "\n## skyline {name}\n\n{}\n\n", one_line(&about));
        flag_table(&mut md, command, role);
        let Some(role) = role else { continue };
        let _ = write!(
            md,
            "\n### The file\n\n`skyline {name} --config FILE`; `skyline config example {name}` \
             prints it with every key at its default.\n"
        );
        for section in role.sections() {
            section_table(&mut md, command, section);
        }
    }
    md
}

/// The flags of `command` (not of its subcommands): flag, variable, value, default, file key,
/// effect.
fn flag_table(md: &mut String, command: &clap::Command, role: Option<Role>) {
    md.push_str("| flag | variable | value | default | file key | effect |\n");
    md.push_str("|---|---|---|---|---|---|\n");
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let id = arg.get_id().as_str();
        let file_key = role.and_then(|r| key_of_flag(r, id));
        let env = arg
            .get_env()
            .map_or_else(|| "—".to_owned(), |e| code(&e.to_string_lossy()));
        let possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| v.get_name().to_owned())
            .collect();
        let value = match arg.get_value_names() {
            _ if !possible.is_empty() => code(&possible.join("|")),
            Some(names) => code(
                &names
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            None => "—".to_owned(),
        };
        let default = flag_default(arg)
            .or_else(|| file_key.and_then(|(_, k)| literal_default(k)))
            .map(|d| code(&d))
            .or_else(|| described_default(arg).map(|d| default_cell(&d)))
            .unwrap_or_else(|| "—".to_owned());
        let file = file_key.map_or_else(|| "—".to_owned(), |(s, k)| code(&full_key(s, k)));
        let _ = writeln!(
            md,
            "| `--{long}` | {env} | {value} | {default} | {file} | {} |",
            cell(&help_of(arg))
        );
    }
}

/// One table of the file: key, type, default, effect.
fn section_table(md: &mut String, command: &clap::Command, section: &Section) {
    let header = match section.table.strip_suffix("[]") {
        Some(array) => format!("[[{array}]]"),
        None => format!("[{}]", section.table),
    };
    let _ = write!(md, "\n#### `{header}`\n\n{}\n\n", section.doc);
    md.push_str("| key | type | default | effect |\n|---|---|---|---|\n");
    for key in section.keys {
        let arg = key
            .flag
            .and_then(|id| command.get_arguments().find(|a| a.get_id() == id));
        let default = match (section.defaults_from, &key.value) {
            (Some(from), _) if !key.key.contains("[]") => format!("`[{from}]`'s"),
            (_, Value::Default(toml)) => code(&plain(toml)),
            (_, Value::Example { default, .. }) if !default.is_empty() => default.to_string(),
            (_, Value::Example { .. }) => arg
                .and_then(described_default)
                .map_or_else(|| "—".to_owned(), |d| default_cell(&d)),
        };
        let _ = writeln!(
            md,
            "| `{}` | {} | {default} | {} |",
            key.key,
            key.ty,
            cell(&effect(key, arg))
        );
    }
}

/// What a key does: its own doc, or its flag's help and the flag.
fn effect(key: &FileKey, arg: Option<&clap::Arg>) -> String {
    match arg {
        Some(arg) if key.doc.is_empty() => {
            let long = arg.get_long().unwrap_or_default();
            format!("{} (`--{long}`)", help_of(arg))
        }
        _ => key.doc.to_owned(),
    }
}

/// The section and key that flag `id` of `role` sets in the file.
fn key_of_flag(role: Role, id: &str) -> Option<(&'static Section, &'static FileKey)> {
    role.sections()
        .iter()
        .find_map(|s| s.keys.iter().find(|k| k.flag == Some(id)).map(|k| (s, k)))
}

fn full_key(section: &Section, key: &FileKey) -> String {
    format!("{}.{}", section.table, key.key)
}

fn literal_default(key: &FileKey) -> Option<String> {
    match key.value {
        Value::Default(toml) => Some(plain(toml)),
        Value::Example { .. } => None,
    }
}

/// A flag's default from clap (`default_value`).
fn flag_default(arg: &clap::Arg) -> Option<String> {
    let values: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// The `[default: ...]` that a flag's help states (flags whose value may come from the file
/// have no clap default).
pub(crate) fn described_default(arg: &clap::Arg) -> Option<String> {
    let help = raw_help(arg);
    let start = help.find("[default: ")?;
    let rest = &help[start + "[default: ".len()..];
    Some(one_line(&rest[..rest.rfind(']')?]))
}

/// A flag's help without its `[default: ...]`.
fn help_of(arg: &clap::Arg) -> String {
    let help = raw_help(arg);
    let help = match help.find("[default: ") {
        Some(start) => {
            let end = help[start..]
                .rfind(']')
                .map_or(help.len(), |e| start + e + 1);
            format!("{}{}", &help[..start], &help[end..])
        }
        None => help,
    };
    one_line(&help)
}

fn raw_help(arg: &clap::Arg) -> String {
    arg.get_long_help()
        .or(arg.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default()
}

/// A TOML value as the reference shows it: `"3s"` as `3s`, `["a", "b"]` as `a,b`.
pub(crate) fn plain(toml: &str) -> String {
    let inner = toml
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(toml);
    inner
        .split(',')
        .map(|part| part.trim().trim_matches('"'))
        .collect::<Vec<_>>()
        .join(",")
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A default a flag's help describes: a value as code, a description as text.
fn default_cell(text: &str) -> String {
    if !text.contains(' ') || text.starts_with('<') {
        code(text)
    } else {
        cell(&text.replace('<', "&lt;"))
    }
}

fn code(text: &str) -> String {
    format!("`{}`", text.replace('|', "\\|"))
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

// === The example ===

/// A config file for `role` with every key at its default; keys without one, and per-name
/// tables, commented out with an example value.
pub fn example(cli: &clap::Command, role: Role) -> String {
    let name = role.name();
    let command = cli.find_subcommand(name);
    let mut toml = format!(
        "# skyline {name}: every key of the config file at its default (`skyline config example \
         {name}`).\n\
         # Flags and SKYLINE_* variables override the file. docs/configuration.md says what each \
         key does;\n\
         # `skyline config check FILE --role {name}` checks a file as the {name} would at start.\n"
    );
    for section in role.sections() {
        let per_name = section.table.contains('<') || section.table.ends_with("[]");
        let hash = if per_name { "# " } else { "" };
        let table = match section.table.find('<') {
            Some(start) => {
                let end = section.table[start..]
                    .find('>')
                    .map_or(section.table.len(), |e| start + e + 1);
                format!(
                    "{}{}{}",
                    &section.table[..start],
                    section.sample,
                    &section.table[end..]
                )
            }
            None => section.table.to_owned(),
        };
        let header = match table.strip_suffix("[]") {
            Some(array) => format!("[[{array}]]"),
            None => format!("[{table}]"),
        };
        let _ = write!(toml, "\n# {}\n{hash}{header}\n", one_line(section.doc));
        for key in section.keys.iter().filter(|k| !k.key.contains("[]")) {
            let arg = command.and_then(|c| {
                key.flag
                    .and_then(|id| c.get_arguments().find(|a| a.get_id() == id))
            });
            // A per-name table whose keys are another table's says so once, in its doc.
            if section.defaults_from.is_none() {
                let mut doc = one_line(&effect(key, arg));
                if let Value::Example { default, .. } = key.value {
                    let default = match default {
                        "" => arg.and_then(described_default),
                        d => Some(d.replace('`', "")),
                    };
                    if let Some(default) = default {
                        let _ = write!(doc, " [default: {default}]");
                    }
                }
                let _ = writeln!(toml, "# {doc}");
            }
            match &key.value {
                Value::Default(value) => {
                    let _ = writeln!(toml, "{hash}{} = {value}", key.key);
                }
                Value::Example { toml: value, .. } => {
                    let _ = writeln!(toml, "# {} = {value}", key.key);
                }
            }
        }
    }
    toml
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::{Args, Command};

    use super::*;

    fn cli() -> Command {
        let mut cli = Command::new("skyline");
        for (name, _) in ROLES {
            let sub = Command::new(name);
            let sub = match name {
                "agent" => crate::config::AgentArgs::augment_args(sub),
                "gateway" => crate::gateway::config::GatewayArgs::augment_args(sub),
                "bridge" => crate::bridge::config::BridgeArgs::augment_args(sub),
                "registry" => crate::config::RegistryArgs::augment_args(sub),
                _ => crate::up::UpArgs::augment_args(sub),
            };
            cli = cli.subcommand(sub);
        }
        cli
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("probe.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A table within a table: `{ x }`, `[{ x }]`, `{ name = { x } }`.
    #[derive(Clone, Copy, Debug)]
    enum Shape {
        Table,
        Array,
        Named,
    }

    /// The fields the parser of `role` knows at `path`, from the error it gives for an unknown
    /// one; `None` when there is no table there.
    fn fields(
        role: Role,
        dir: &tempfile::TempDir,
        path: &[(String, Shape)],
    ) -> Option<Vec<String>> {
        let mut body = "zz_probe = 1".to_owned();
        for (name, shape) in path.iter().rev() {
            body = match shape {
                Shape::Table => format!("{name} = {{ {body} }}"),
                Shape::Array => format!("{name} = [{{ {body} }}]"),
                Shape::Named => format!("{name} = {{ x = {{ {body} }} }}"),
            };
        }
        let e = role.check(write(dir, &body)).err()?;
        let rest = e.reason.strip_prefix("unknown field `zz_probe`")?;
        let names = rest.split('`').skip(1).step_by(2).map(str::to_owned);
        Some(names.collect())
    }

    /// Every leaf key the parser of `role` accepts, as `table.key`, `service[].key`,
    /// `routes.<>.key`.
    fn parser_keys(role: Role) -> BTreeSet<String> {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = BTreeSet::new();
        let mut stack = vec![Vec::<(String, Shape)>::new()];
        while let Some(path) = stack.pop() {
            assert!(path.len() < 6, "{path:?}");
            for field in fields(role, &dir, &path).unwrap_or_default() {
                let nested = [Shape::Table, Shape::Array, Shape::Named]
                    .into_iter()
                    .map(|shape| {
                        let mut p = path.clone();
                        p.push((field.clone(), shape));
                        p
                    })
                    .find(|p| fields(role, &dir, p).is_some());
                match nested {
                    Some(p) => stack.push(p),
                    None => {
                        let mut key = String::new();
                        for (name, shape) in &path {
                            key.push_str(name);
                            key.push_str(match shape {
                                Shape::Table => ".",
                                Shape::Array => "[].",
                                Shape::Named => ".<>.",
                            });
                        }
                        key.push_str(&field);
                        keys.insert(key);
                    }
                }
            }
        }
        keys
    }

    /// The keys a role's table lists, in the probe's notation (`routes.<>.hold`).
    fn table_keys(role: Role) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for s in role.sections() {
            let table = match (s.table.find('<'), s.table.find('>')) {
                (Some(a), Some(b)) => format!("{}<>{}", &s.table[..a], &s.table[b + 1..]),
                _ => s.table.to_owned(),
            };
            for k in s.keys {
                keys.insert(format!("{table}.{}", k.key));
            }
        }
        keys
    }

    #[test]
    fn every_key_a_parser_accepts_is_in_its_roles_table_and_no_other() {
        for role in Role::ALL {
            let parser = parser_keys(role);
            assert!(parser.len() > 10, "{role:?}: the probe found {parser:?}");
            let table = table_keys(role);
            let missing: Vec<_> = parser.difference(&table).collect();
            assert!(
                missing.is_empty(),
                "{role:?}: keys not in the table: {missing:?}"
            );
            // A table may also describe the array a documented element field belongs to.
            let unknown: Vec<_> = table
                .iter()
                .filter(|k| !parser.contains(*k))
                .filter(|k| !parser.iter().any(|p| p.starts_with(&format!("{k}[]."))))
                .collect();
            assert!(
                unknown.is_empty(),
                "{role:?}: keys the parser refuses: {unknown:?}"
            );
        }
    }

    #[test]
    fn every_flag_a_table_names_exists_and_its_stated_default_is_the_tables() {
        let cli = cli();
        for role in Role::ALL {
            let command = cli.find_subcommand(role.name()).unwrap();
            for section in role.sections() {
                for key in section.keys {
                    let Some(id) = key.flag else { continue };
                    let arg = command.get_arguments().find(|a| a.get_id() == id);
                    let arg = arg.unwrap_or_else(|| panic!("{role:?}: no flag {id}"));
                    if let (Value::Default(toml), Some(stated)) =
                        (&key.value, described_default(arg))
                    {
                        // A boolean key whose flag takes "on" or "off" (`--metrics`).
                        let stated = match (key.ty, stated.as_str()) {
                            ("boolean", "on") => "true".to_owned(),
                            ("boolean", "off") => "false".to_owned(),
                            _ => stated,
                        };
                        assert_eq!(plain(toml), stated, "{role:?}: {}", key.key);
                    }
                }
            }
        }
    }

    #[test]
    fn the_example_of_each_role_resolves_to_the_defaults() {
        let cli = cli();
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &example(&cli, Role::Agent));
        let from_example = crate::config::AgentArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(
            from_example.resolve().unwrap(),
            crate::config::AgentArgs::default().resolve().unwrap()
        );

        let path = write(&dir, &example(&cli, Role::Gateway));
        let mut from_example = crate::gateway::config::GatewayArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        from_example.reload = None;
        let defaults = crate::gateway::config::GatewayArgs::default()
            .resolve()
            .unwrap();
        assert_eq!(format!("{from_example:?}"), format!("{defaults:?}"));

        let path = write(&dir, &example(&cli, Role::Bridge));
        let mut from_example = crate::bridge::config::BridgeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        from_example.reload = None;
        let defaults = crate::bridge::config::BridgeArgs::default()
            .resolve()
            .unwrap();
        assert_eq!(format!("{from_example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn every_example_value_has_the_type_of_its_key() {
        let dir = tempfile::tempdir().unwrap();
        for role in Role::ALL {
            for section in role.sections() {
                let table = match (section.table.find('<'), section.table.find('>')) {
                    (Some(a), Some(b)) => {
                        let (head, tail) = (&section.table[..a], &section.table[b + 1..]);
                        format!("[{head}{}{tail}]", section.sample)
                    }
                    _ => match section.table.strip_suffix("[]") {
                        Some(array) => format!("[[{array}]]"),
                        None => format!("[{}]", section.table),
                    },
                };
                for key in section.keys.iter().filter(|k| !k.key.contains("[]")) {
                    let value = match key.value {
                        Value::Default(v) | Value::Example { toml: v, .. } => v,
                    };
                    let text = format!("{table}\n{} = {value}\n", key.key);
                    let Err(e) = role.check(write(&dir, &text)) else {
                        continue;
                    };
                    // Refused for a missing companion key (a service's name) is fine; refused
                    // for the value's type or the key's name is not.
                    for parse_error in ["unknown field", "invalid type", "did not match"] {
                        assert!(!e.reason.contains(parse_error), "{role:?}: {text}: {e}");
                    }
                }
            }
        }
    }
}
