//! `preset = "openai"` on a route: the upstream and injection a provider
//! needs, so a route is two lines. Anything written on the route wins.

/// What a preset fills in.
struct Preset {
    name: &'static str,
    /// `None`: the upstream is per-customer and must be given.
    upstream: Option<&'static str>,
    header: &'static str,
    format: &'static str,
    placeholder_env: &'static str,
}

const PRESETS: &[Preset] = &[
    Preset {
        name: "openai",
        upstream: Some("https://api.openai.com"),
        header: "authorization",
        format: "Bearer {secret}",
        placeholder_env: "OPENAI_API_KEY",
    },
    Preset {
        name: "anthropic",
        upstream: Some("https://api.anthropic.com"),
        header: "x-api-key",
        format: "{secret}",
        placeholder_env: "ANTHROPIC_API_KEY",
    },
    Preset {
        name: "google",
        upstream: Some("https://generativelanguage.googleapis.com"),
        header: "x-goog-api-key",
        format: "{secret}",
        placeholder_env: "GEMINI_API_KEY",
    },
    Preset {
        name: "azure-openai",
        upstream: None,
        header: "api-key",
        format: "{secret}",
        placeholder_env: "AZURE_OPENAI_API_KEY",
    },
    Preset {
        name: "github",
        upstream: Some("https://api.github.com"),
        header: "authorization",
        format: "Bearer {secret}",
        placeholder_env: "GITHUB_TOKEN",
    },
];

/// The parts of a route a preset may fill.
#[derive(Debug, Default)]
pub(super) struct Filled {
    pub upstream: Option<String>,
    /// `(header, format)`.
    pub header: Option<(String, String)>,
    pub placeholder_env: Option<String>,
}

/// Looks a preset up; an error says what is wrong, for the route's `preset` key.
pub(super) fn fill(name: &str) -> Result<Filled, String> {
    let preset = PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        format!("unknown preset {name:?} (known: {})", names.join(", "))
    })?;
    Ok(Filled {
        upstream: preset.upstream.map(str::to_string),
        header: Some((preset.header.to_string(), preset.format.to_string())),
        placeholder_env: Some(preset.placeholder_env.to_string()),
    })
}
