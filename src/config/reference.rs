//! How a role's file keys are described: each role lists every key of its file as a table of
//! [`Section`]s next to its parser (`agent::config::AGENT_FILE`, `gateway::config::FILE`,
//! `bridge::config::FILE`; shared sections with what they configure). `skyline config`
//! (`cli::config`) writes docs/configuration.md and the examples from these tables.

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
