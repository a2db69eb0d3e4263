//! Policy as code: Cedar policies decide every token exchange at request time.
//!
//! Owns: loading and validating the policy file against the schema, the policy in force
//! (swapped atomically on reload; a broken file never replaces a good one), and decisions.
//! Default deny: with no policy file, or no `permit` matching, nothing is allowed; a `forbid`
//! always wins over a `permit` (Cedar's semantics).
//!
//! Names operators write policies against (the shipped schema, `deploy/policy/`):
//! principal `Tessera::Agent::"<SPIFFE ID>"` with `owner`, `purpose`, `risk` from its entry;
//! action `Tessera::Action::"exchange"`; resource `Tessera::Audience::"<audience>"`; context
//! `scope`, `task_id`, `ttl_seconds`, `subject` (`iss`, `sub` and the subject token's other
//! string, boolean and number claims, as strings).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

/// The built-in schema (the same file `deploy/policy/` ships for operators to extend).
pub const BUILTIN_SCHEMA: &str = include_str!("../deploy/policy/tessera.cedarschema");

/// Largest policy file accepted: a policy set is code people review, not data.
const MAX_POLICY_BYTES: u64 = 4 << 20;

/// Why a policy could not be loaded. The previous policy stays in force.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("policy file {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Cedar syntax error.
    #[error("policy file {path}: {message}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// Cedar's message (with line and column).
        message: String,
    },
    /// The schema could not be parsed.
    #[error("policy schema {origin}: {message}")]
    Schema {
        /// Path or "built-in".
        origin: String,
        /// Cedar's message.
        message: String,
    },
    /// The policies do not type-check against the schema (e.g. a misspelt attribute).
    #[error("policy file {path} does not validate against the schema: {message}")]
    Invalid {
        /// Path.
        path: PathBuf,
        /// Every validation error, one per line.
        message: String,
    },
}

/// What one decision needs to know. Built once per exchange; each scope is decided on its own.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// The acting agent's SPIFFE ID.
    pub agent: &'a str,
    /// Its entry's owner (empty when unset).
    pub owner: &'a str,
    /// Its entry's purpose (empty when unset).
    pub purpose: &'a str,
    /// Its entry's risk tier, `low`/`medium`/`high` (empty when unset).
    pub risk: &'a str,
    /// The audience asked for.
    pub audience: &'a str,
    /// The task id.
    pub task_id: &'a str,
    /// The lifetime the token would get.
    pub ttl_seconds: i64,
    /// `iss`, `sub` and the subject token's other string, boolean and number claims, as strings.
    pub subject: &'a [(String, String)],
}

/// The outcome for one scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The scope decided.
    pub scope: String,
    /// Allowed?
    pub allowed: bool,
    /// Ids of the policies that decided it (the `@id` annotation when present).
    pub policies: Vec<String>,
    /// Policy evaluation errors; any error denies the scope (fail closed).
    pub errors: Vec<String>,
}

struct Loaded {
    set: PolicySet,
    /// Cedar's policy id → the id operators see (`@id("...")` or Cedar's).
    names: HashMap<String, String>,
    /// Digest of the source, so an unchanged file is not reloaded.
    digest: [u8; 32],
    count: usize,
}

/// The policy in force.
pub struct Engine {
    path: Option<PathBuf>,
    /// Policies are validated against it at load, and every request and entity at decision
    /// time: without it, action groups have no entities (a `forbid` on `action in` a group
    /// never applied) and a claim's type went unchecked (review AY-1).
    schema: Schema,
    /// The subject claims the schema declares: a request's subject record holds only these
    /// (records are closed, and tokens carry claims no schema lists).
    claims: HashSet<String>,
    current: ArcSwap<Loaded>,
    authorizer: Authorizer,
    /// Parsed once: building Cedar names from strings on every request showed up in profiles.
    agent_type: EntityTypeName,
    audience_type: EntityTypeName,
    action: EntityUid,
    /// The principal entity per agent, rebuilt when its entry's attributes change.
    principals: dashmap::DashMap<String, Arc<(String, String, String, Entities)>>,
}

/// Bound on cached principal entities (one per agent in use).
const PRINCIPAL_CACHE_CAP: usize = 10_000;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.path)
            .field("policies", &self.current.load().count)
            .finish_non_exhaustive()
    }
}

fn digest(b: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

fn type_name(s: &str) -> EntityTypeName {
    EntityTypeName::from_str(s).expect("static Cedar type names parse")
}

/// Parses a schema in Cedar's human-readable format; returns it with the names of the
/// subject claims it declares (what a request's `context.subject` is cut down to).
fn parse_schema(text: &str, origin: &str) -> Result<(Schema, HashSet<String>), PolicyError> {
    let refuse = |message: String| PolicyError::Schema {
        origin: origin.into(),
        message,
    };
    let schema = Schema::from_cedarschema_str(text)
        .map(|(s, _warnings)| s)
        .map_err(|e| refuse(e.to_string()))?;
    let json = cedar_policy::SchemaFragment::from_cedarschema_str(text)
        .map_err(|e| refuse(e.to_string()))
        .and_then(|(f, _)| f.to_json_value().map_err(|e| refuse(e.to_string())))?;
    let claims = subject_claims(&json).map_err(refuse)?;
    Ok((schema, claims))
}

/// Cedar's primitive type names, which are never common types.
const PRIMITIVES: [&str; 8] = [
    "String",
    "Long",
    "Bool",
    "Boolean",
    "Record",
    "Set",
    "Entity",
    "Extension",
];

/// The subject claims the schema declares for `Tessera::Action::"exchange"` (its context's
/// `subject` record), each of which must be a String: claims reach policies as strings
/// (booleans and numbers included, as `"true"`, `"42"`), so a schema typing one otherwise is
/// refused; with it, `email_verified == false` in a `forbid` would never forbid. Common
/// types are followed through aliases and namespaces as Cedar resolves them (a name is looked
/// up in its own namespace, then in the empty one), so that no alias hides a type.
fn subject_claims(json: &serde_json::Value) -> Result<HashSet<String>, String> {
    let namespaces = json.as_object().cloned().unwrap_or_default();
    let common = |qualified: &str| -> Option<(String, serde_json::Value)> {
        let (ns, name) = qualified.rsplit_once("::").unwrap_or(("", qualified));
        let t = namespaces.get(ns)?.get("commonTypes")?.get(name)?;
        Some((ns.to_owned(), t.clone()))
    };
    // A type with every reference to a common type replaced by what it names.
    let resolve =
        |mut t: serde_json::Value, mut ns: String| -> Result<(serde_json::Value, String), String> {
            for _ in 0..32 {
                let name = match t["type"].as_str() {
                    Some("EntityOrCommon") => t["name"].as_str().unwrap_or_default().to_owned(),
                    Some(n) if !PRIMITIVES.contains(&n) => n.to_owned(),
                    _ => return Ok((t, ns)),
                };
                let found = if name.contains("::") {
                    common(&name)
                } else {
                    common(&format!("{ns}::{name}")).or_else(|| common(&name))
                };
                match found {
                    Some((n, next)) => (t, ns) = (next, n),
                    // An entity type or a primitive by its qualified name (`__cedar::String`).
                    None => return Ok((t, ns)),
                }
            }
            Err("the schema's common types refer to each other in a loop".into())
        };
    let Some(exchange) = namespaces
        .get("Tessera")
        .and_then(|n| n.get("actions"))
        .and_then(|a| a.get("exchange"))
    else {
        return Ok(HashSet::new());
    };
    let (context, ns) = resolve(exchange["appliesTo"]["context"].clone(), "Tessera".into())?;
    let (subject, ns) = resolve(context["attributes"]["subject"].clone(), ns)?;
    let Some(attrs) = subject["attributes"].as_object() else {
        return Ok(HashSet::new());
    };
    let mut not_strings = Vec::new();
    for (name, t) in attrs {
        let (t, _) = resolve(t.clone(), ns.clone())?;
        let ty = match t["type"].as_str() {
            Some("EntityOrCommon") => t["name"].as_str().unwrap_or("?").to_owned(),
            other => other.unwrap_or("?").to_owned(),
        };
        if !matches!(ty.as_str(), "String" | "__cedar::String") {
            not_strings.push(format!("{name} ({ty})"));
        }
    }
    if !not_strings.is_empty() {
        return Err(format!(
            "the exchange context's subject claims must all be String (claims reach policies as \
             strings, so a comparison with another type would never match): {}",
            not_strings.join(", ")
        ));
    }
    Ok(attrs.keys().cloned().collect())
}

impl Engine {
    /// Loads `path` (or nothing: default deny) validated against `schema_path` (or the
    /// built-in schema).
    pub fn load(path: Option<&Path>, schema_path: Option<&Path>) -> Result<Self, PolicyError> {
        let (schema, claims) = match schema_path {
            None => parse_schema(BUILTIN_SCHEMA, "built-in")?,
            Some(p) => {
                let text = crate::fsutil::read_trusted_text(p, MAX_POLICY_BYTES, "policy schema")
                    .map_err(|e| PolicyError::Schema {
                    origin: p.display().to_string(),
                    message: e.to_string(),
                })?;
                parse_schema(&text, &p.display().to_string())?
            }
        };
        let empty = Loaded {
            set: PolicySet::new(),
            names: HashMap::new(),
            digest: digest(b""),
            count: 0,
        };
        let this = Self {
            path: path.map(Path::to_owned),
            schema,
            claims,
            current: ArcSwap::from_pointee(empty),
            authorizer: Authorizer::new(),
            agent_type: type_name("Tessera::Agent"),
            audience_type: type_name("Tessera::Audience"),
            action: EntityUid::from_type_name_and_id(
                type_name("Tessera::Action"),
                EntityId::new("exchange"),
            ),
            principals: dashmap::DashMap::new(),
        };
        // Every decision is checked against the schema, so one that does not fit what the
        // daemon sends (a context without task_id, an Agent with an attribute the entry has
        // not) would deny every exchange while loading fine. Tried once here with what a
        // decision sends, every declared claim present, and refused with Cedar's reason.
        this.probe().map_err(|message| PolicyError::Schema {
            origin: schema_path.map_or_else(|| "built-in".into(), |p| p.display().to_string()),
            message: format!(
                "it does not fit what tesserad sends to policies (Agent owner, purpose and risk \
                 as String; context scope and task_id as String, ttl_seconds as Long and \
                 subject as a record of String claims): {message}"
            ),
        })?;
        if let Some(p) = path {
            // At start a missing file is an error (a reload takes it for "no policy").
            std::fs::metadata(p).map_err(|source| PolicyError::Read {
                path: p.to_owned(),
                source,
            })?;
            this.reload()?;
        }
        Ok(this)
    }

    /// The policy file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Number of policies in force.
    pub fn len(&self) -> usize {
        self.current.load().count
    }

    /// True when no policy is in force (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parses and validates `text` as the policy file's content.
    fn compile(&self, text: &str, path: &Path) -> Result<Loaded, PolicyError> {
        let set = PolicySet::from_str(text).map_err(|e| PolicyError::Parse {
            path: path.to_owned(),
            message: miette_free(&e),
        })?;
        let result = Validator::new(self.schema.clone()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            let message = result
                .validation_errors()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            return Err(PolicyError::Invalid {
                path: path.to_owned(),
                message,
            });
        }
        let mut names = HashMap::new();
        let mut count = 0;
        for p in set.policies() {
            count += 1;
            let name = p
                .annotation("id")
                .map_or_else(|| p.id().to_string(), str::to_owned);
            names.insert(p.id().to_string(), name);
        }
        Ok(Loaded {
            set,
            names,
            digest: digest(text.as_bytes()),
            count,
        })
    }

    /// Re-reads the policy file. On any error the policy in force is kept and the error
    /// returned for the caller to report. Returns `Ok(None)` when the file is unchanged.
    pub fn reload(&self) -> Result<Option<usize>, PolicyError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let read_err = |source| PolicyError::Read {
            path: path.clone(),
            source,
        };
        let text = match crate::fsutil::read_trusted_text(path, MAX_POLICY_BYTES, "policy file") {
            Ok(t) => t,
            // Removed while running: nothing permits any more (review AY-7). Keeping the
            // last file's permits would leave in force what the operator took away, which the
            // same missing file refuses at start.
            // Gone for the walk, yet there now: replaced while being read (the kubelet swaps
            // a ConfigMap's `..data` link): an error, tried again, not "removed" (review BE-4).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.exists() => {
                return Err(read_err(e));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.is_empty() {
                    return Ok(None);
                }
                self.current.store(Arc::new(Loaded {
                    set: PolicySet::new(),
                    names: HashMap::new(),
                    digest: digest(b""),
                    count: 0,
                }));
                return Ok(Some(0));
            }
            // A file others could change (review AY-6) is an error like any other: the
            // policy in force stays.
            Err(e) => return Err(read_err(e)),
        };
        if digest(text.as_bytes()) == self.current.load().digest && !self.is_empty() {
            return Ok(None);
        }
        let loaded = self.compile(&text, path)?;
        let n = loaded.count;
        self.current.store(Arc::new(loaded));
        Ok(Some(n))
    }

    /// Decides each scope on its own. The result has one [`Decision`] per scope, in order.
    pub fn decide(&self, input: &Input<'_>, scopes: &[String]) -> Vec<Decision> {
        let loaded = self.current.load();
        let deny_all = |reason: &str| {
            scopes
                .iter()
                .map(|s| Decision {
                    scope: s.clone(),
                    allowed: false,
                    policies: Vec::new(),
                    errors: vec![reason.to_owned()],
                })
                .collect()
        };
        if loaded.count == 0 {
            return deny_all("no policy in force (default deny)");
        }
        let principal =
            EntityUid::from_type_name_and_id(self.agent_type.clone(), EntityId::new(input.agent));
        let resource = EntityUid::from_type_name_and_id(
            self.audience_type.clone(),
            EntityId::new(input.audience),
        );
        let entities = match self.principal_entities(&principal, input) {
            Ok(e) => e,
            Err(e) => return deny_all(&format!("cannot build the request: {e}")),
        };
        let subject = RestrictedExpression::new_record(
            input
                .subject
                .iter()
                .filter(|(k, _)| self.claims.contains(k))
                .map(|(k, v)| (k.clone(), RestrictedExpression::new_string(v.clone()))),
        );
        let subject = match subject {
            Ok(s) => s,
            Err(e) => return deny_all(&format!("cannot build the subject record: {e}")),
        };
        scopes
            .iter()
            .map(|scope| {
                match self.request(&principal, &resource, scope, input, subject.clone()) {
                    Err(e) => Decision {
                        scope: scope.clone(),
                        allowed: false,
                        policies: Vec::new(),
                        errors: vec![e],
                    },
                    Ok(r) => {
                        let resp = self.authorizer.is_authorized(&r, &loaded.set, &entities.3);
                        let d = resp.diagnostics();
                        // Cedar skips a policy whose evaluation errors (e.g. a `forbid` that
                        // reads a claim the token lacks) and may still allow. Fail closed:
                        // any evaluation error denies the scope.
                        let clean = d.errors().next().is_none();
                        Decision {
                            scope: scope.clone(),
                            allowed: clean && resp.decision() == CedarDecision::Allow,
                            policies: d
                                .reason()
                                .map(|id| {
                                    let id = id.to_string();
                                    loaded.names.get(&id).cloned().unwrap_or(id)
                                })
                                .collect(),
                            errors: d.errors().map(ToString::to_string).collect(),
                        }
                    }
                }
            })
            .collect()
    }
}

impl Engine {
    /// Builds the entities and one request as [`Engine::decide`] does, for a made-up agent
    /// and a subject holding every declared claim.
    /// One decision's request, validated against the schema: what [`Engine::decide`] asks
    /// Cedar, and what [`Engine::probe`] tries at load.
    fn request(
        &self,
        principal: &EntityUid,
        resource: &EntityUid,
        scope: &str,
        input: &Input<'_>,
        subject: RestrictedExpression,
    ) -> Result<Request, String> {
        let context = Context::from_pairs([
            (
                "scope".to_owned(),
                RestrictedExpression::new_string(scope.to_owned()),
            ),
            (
                "task_id".to_owned(),
                RestrictedExpression::new_string(input.task_id.to_owned()),
            ),
            (
                "ttl_seconds".to_owned(),
                RestrictedExpression::new_long(input.ttl_seconds),
            ),
            ("subject".to_owned(), subject),
        ])
        .map_err(|e| e.to_string())?;
        Request::new(
            principal.clone(),
            self.action.clone(),
            resource.clone(),
            context,
            Some(&self.schema),
        )
        .map_err(|e| e.to_string())
    }

    fn probe(&self) -> Result<(), String> {
        let agent = "spiffe://probe.invalid/agent";
        let principal =
            EntityUid::from_type_name_and_id(self.agent_type.clone(), EntityId::new(agent));
        let input = Input {
            agent,
            audience: "probe",
            owner: "",
            purpose: "",
            risk: "low",
            task_id: "probe",
            ttl_seconds: 1,
            subject: &[],
        };
        self.principal_entities(&principal, &input)?;
        self.principals.remove(agent);
        let subject = RestrictedExpression::new_record(
            self.claims
                .iter()
                .map(|k| (k.clone(), RestrictedExpression::new_string("x".into()))),
        )
        .map_err(|e| e.to_string())?;
        let resource =
            EntityUid::from_type_name_and_id(self.audience_type.clone(), EntityId::new("probe"));
        self.request(&principal, &resource, "x", &input, subject)
            .map(|_| ())
    }

    /// The agent as a Cedar entity (the audience needs none: it has no attributes), cached
    /// per agent and rebuilt when its entry's owner, purpose or risk changes.
    fn principal_entities(
        &self,
        principal: &EntityUid,
        input: &Input<'_>,
    ) -> Result<Arc<(String, String, String, Entities)>, String> {
        if let Some(e) = self.principals.get(input.agent)
            && e.0 == input.owner
            && e.1 == input.purpose
            && e.2 == input.risk
        {
            return Ok(Arc::clone(&e));
        }
        let attrs = HashMap::from([
            (
                "owner".to_owned(),
                RestrictedExpression::new_string(input.owner.to_owned()),
            ),
            (
                "purpose".to_owned(),
                RestrictedExpression::new_string(input.purpose.to_owned()),
            ),
            (
                "risk".to_owned(),
                RestrictedExpression::new_string(input.risk.to_owned()),
            ),
        ]);
        let agent =
            Entity::new(principal.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?;
        // With the schema: its action entities (and their groups) join the store, and the
        // agent's attributes are checked against their declared types.
        let entities =
            Entities::from_entities([agent], Some(&self.schema)).map_err(|e| e.to_string())?;
        let v = Arc::new((
            input.owner.to_owned(),
            input.purpose.to_owned(),
            input.risk.to_owned(),
            entities,
        ));
        if self.principals.len() >= PRINCIPAL_CACHE_CAP {
            self.principals.clear();
        }
        self.principals
            .insert(input.agent.to_owned(), Arc::clone(&v));
        Ok(v)
    }
}

/// Cedar's parse errors render their detail through `Display` of each error; collect them
/// into one line per error so logs and `--check-config` stay readable.
fn miette_free(e: &cedar_policy::ParseErrors) -> String {
    e.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reloads the policy when its file changes or on demand (SIGHUP).
///
/// Changes are debounced: the file must stay the same (inode, change time) for `settle`
/// before it is read, so an editor's half-written save is not loaded. A file that fails to load
/// is reported once per change and the previous policy stays in force; one that cannot be read
/// (others could write it) is tried again at every `poll` until it can.
pub async fn watch(
    engine: Arc<Engine>,
    mut hup: tokio::sync::mpsc::Receiver<()>,
    mut sd: crate::shutdown::Shutdown,
    poll: Duration,
    settle: Duration,
    on_result: impl Fn(Result<Option<usize>, &PolicyError>) + Send + 'static,
) {
    let Some(path) = engine.path().map(Path::to_owned) else {
        // No file: nothing to watch; SIGHUP has nothing to reload.
        sd.wait().await;
        return;
    };
    // The inode and its change time: a write, a chmod or chown (which make a refused file
    // acceptable and change nothing else, review BD-4) and a rename over it each change one.
    let stamp = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
    };
    let mut seen = stamp(&path);
    // The last reload's error while it fails. One of reading (a mode others could write, a
    // file replaced while read) is tried again at every tick, since what fixes it may be a
    // directory above the file, which the stamp does not see; a policy that does not compile
    // only when the file changes (review BE-5). Either is reported again only when the file
    // or the error changes.
    let mut failing: Option<(String, bool)> = None;
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            () = sd.wait() => return,
            h = hup.recv() => { if h.is_none() { return; } true }
            _ = tick.tick() => false,
        };
        let now = stamp(&path);
        let retry = failing.as_ref().is_some_and(|f| f.1);
        if !forced && now == seen && !retry {
            continue;
        }
        // Wait until the file stops changing.
        let mut last = now;
        loop {
            tokio::select! {
                () = sd.wait() => return,
                () = tokio::time::sleep(settle) => {}
            }
            let again = stamp(&path);
            if again == last {
                break;
            }
            last = again;
        }
        let changed = last != seen;
        seen = last;
        let engine = Arc::clone(&engine);
        let r = match tokio::task::spawn_blocking(move || engine.reload()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "policy reload panicked; the previous policy stays in force");
                continue;
            }
        };
        match &r {
            Ok(n) => {
                failing = None;
                on_result(Ok(*n));
            }
            Err(e) => {
                let msg = e.to_string();
                if forced || changed || failing.as_ref().is_none_or(|f| f.0 != msg) {
                    on_result(Err(e));
                }
                failing = Some((msg, matches!(e, PolicyError::Read { .. })));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(subject: &'a [(String, String)], risk: &'a str) -> Input<'a> {
        Input {
            agent: "spiffe://td/agent/a",
            owner: "team-a",
            purpose: "tests",
            risk,
            audience: "https://tools.example/api",
            task_id: "t1",
            ttl_seconds: 300,
            subject,
        }
    }

    fn engine(text: &str) -> Result<Engine, PolicyError> {
        engine_with(None, Some(text))
    }

    /// An engine loaded from files holding `schema` (else the built-in one) and `policy`.
    fn engine_with(schema: Option<&str>, policy: Option<&str>) -> Result<Engine, PolicyError> {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: Option<&str>| {
            text.map(|t| {
                let path = dir.path().join(name);
                std::fs::write(&path, t).unwrap();
                path
            })
        };
        let (s, p) = (write("s.cedarschema", schema), write("p.cedar", policy));
        Engine::load(p.as_deref(), s.as_deref())
    }

    #[test]
    fn default_deny_without_policies() {
        let e = Engine::load(None, None).unwrap();
        let subj = vec![("iss".into(), "i".into()), ("sub".into(), "u".into())];
        let d = e.decide(&input(&subj, "low"), &["read".into()]);
        assert!(!d[0].allowed);
    }

    #[test]
    fn each_scope_decided_alone_and_forbid_wins() {
        let e = engine(
            r#"
            @id("readers")
            permit(principal, action == Tessera::Action::"exchange", resource)
              when { context.scope == "read" || context.scope == "write" };
            @id("no-writes-for-high-risk")
            forbid(principal, action, resource)
              when { context.scope == "write" && principal.risk == "high" };
            "#,
        )
        .unwrap();
        assert_eq!(e.len(), 2);
        let subj = vec![("iss".into(), "i".into()), ("sub".into(), "u".into())];
        let scopes = ["read".to_owned(), "write".to_owned(), "admin".to_owned()];
        let d = e.decide(&input(&subj, "low"), &scopes);
        assert_eq!(
            d.iter().map(|d| d.allowed).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert_eq!(d[0].policies, ["readers"]);
        let d = e.decide(&input(&subj, "high"), &scopes);
        assert_eq!(
            d.iter().map(|d| d.allowed).collect::<Vec<_>>(),
            [true, false, false]
        );
        assert_eq!(d[1].policies, ["no-writes-for-high-risk"]);
    }

    #[test]
    fn subject_claims_and_ttl_reach_the_context() {
        let e = engine(
            r#"permit(principal, action, resource)
                 when { context.subject has email && context.subject.email like "*@example.com"
                        && context.ttl_seconds <= 600 };"#,
        )
        .unwrap();
        let ok = vec![
            ("iss".into(), "i".into()),
            ("sub".into(), "u".into()),
            ("email".into(), "ann@example.com".into()),
        ];
        let bad = vec![("iss".into(), "i".into()), ("sub".into(), "u".into())];
        assert!(e.decide(&input(&ok, "low"), &["x".into()])[0].allowed);
        assert!(!e.decide(&input(&bad, "low"), &["x".into()])[0].allowed);
        let mut long = input(&ok, "low");
        long.ttl_seconds = 601;
        assert!(!e.decide(&long, &["x".into()])[0].allowed);
    }

    #[test]
    fn a_forbid_that_errors_denies() {
        // `groups` is not in every token: the forbid errors when it is absent, and that must
        // not let the permit through.
        let e = engine_with(
            Some(&BUILTIN_SCHEMA.replace("email?: String,", "email?: String,\n    groups: String,")),
            Some(
                r#"permit(principal, action, resource);
               forbid(principal, action, resource) when { context.subject.groups == "contractors" };"#,
            ),
        )
        .unwrap();
        let without = vec![("iss".into(), "i".into()), ("sub".into(), "u".into())];
        let d = e.decide(&input(&without, "low"), &["x".into()]);
        assert!(!d[0].allowed, "{d:?}");
        assert!(!d[0].errors.is_empty());
        let staff = vec![
            ("iss".into(), "i".into()),
            ("sub".into(), "u".into()),
            ("groups".into(), "staff".into()),
        ];
        assert!(e.decide(&input(&staff, "low"), &["x".into()])[0].allowed);
    }

    #[test]
    fn broken_or_invalid_files_are_refused() {
        assert!(matches!(
            engine("permit(principal, action, resource"),
            Err(PolicyError::Parse { .. })
        ));
        // Type error against the schema: `principal.team` does not exist.
        assert!(matches!(
            engine(r#"permit(principal, action, resource) when { principal.team == "x" };"#),
            Err(PolicyError::Invalid { .. })
        ));
    }

    #[test]
    fn a_schema_typing_a_subject_claim_other_than_string_is_refused() {
        // As the shipped schema advises, then with a claim typed as the IdP sends it.
        let extended =
            BUILTIN_SCHEMA.replace("email?: String,", "email?: String,\n    groups?: String,");
        parse_schema(&extended, "test").unwrap();
        let bool_claim = BUILTIN_SCHEMA.replace("email_verified?: String", "email_verified?: Bool");
        let e = parse_schema(&bool_claim, "test").unwrap_err().to_string();
        assert!(
            e.contains("must all be String") && e.contains("email_verified (Bool)"),
            "{e}"
        );
        // An inline record in the context, not the common type, is checked the same way.
        let inline = BUILTIN_SCHEMA.replace(
            "subject: Subject,",
            "subject: { iss: String, sub: String, n: Long },",
        );
        assert_ne!(inline, BUILTIN_SCHEMA);
        let e = parse_schema(&inline, "test").unwrap_err().to_string();
        assert!(e.contains("n (Long)"), "{e}");
        // Behind an alias, or a type of another namespace (review AY-1): found all the same.
        let alias = bool_claim
            .replace("type Subject = {", "type Claims = {")
            .replace(
                "  action exchange",
                "  type Subject = Claims;\n  action exchange",
            );
        let e = parse_schema(&alias, "test").unwrap_err().to_string();
        assert!(e.contains("email_verified (Bool)"), "{e}");
        let other = format!(
            "namespace Other {{ type Subject = {{ iss: String, sub: String, v?: Bool }}; }}\n{}",
            BUILTIN_SCHEMA.replace("subject: Subject,", "subject: Other::Subject,")
        );
        let e = parse_schema(&other, "test").unwrap_err().to_string();
        assert!(e.contains("v (Bool)"), "{e}");
    }

    #[test]
    fn a_schema_that_does_not_fit_what_decisions_send_is_refused_at_load() {
        // Review BB-1: decided against the schema, these would deny every exchange.
        for (from, to) in [
            ("      task_id: String,\n", ""),
            (
                "    risk: String,\n",
                "    risk: String,\n    team: String,\n",
            ),
            ("      ttl_seconds: Long,", "      ttl_seconds: String,"),
        ] {
            let changed = BUILTIN_SCHEMA.replace(from, to);
            assert_ne!(changed, BUILTIN_SCHEMA, "{from:?}");
            let e = engine_with(Some(&changed), None).unwrap_err().to_string();
            assert!(
                e.contains("does not fit what tesserad sends"),
                "{from:?}: {e}"
            );
        }
        // An optional attribute more is fine.
        engine_with(
            Some(&BUILTIN_SCHEMA.replace(
                "    risk: String,\n",
                "    risk: String,\n    team?: String,\n",
            )),
            None,
        )
        .unwrap();
    }

    #[test]
    fn a_forbid_on_an_action_group_applies() {
        // Validated against a schema with an action group, then decided with it: the group
        // exists at decision time too (review AY-1: decided without the schema, `action in`
        // a group was always false and the forbid never applied).
        let schema = BUILTIN_SCHEMA.replace(
            "  action exchange appliesTo",
            "  action anything;\n  action exchange in [anything] appliesTo",
        );
        let e = engine_with(
            Some(&schema),
            Some(
                r#"permit(principal, action, resource);
               forbid(principal, action in Tessera::Action::"anything", resource);"#,
            ),
        )
        .unwrap();
        // Claims no schema declares are left out of the request, not refused.
        let subject = vec![
            ("iss".into(), "i".into()),
            ("sub".into(), "u".into()),
            ("undeclared".into(), "x".into()),
        ];
        let d = e.decide(&input(&subject, "low"), &["x".into()]);
        assert!(!d[0].allowed, "{d:?}");
        // Without the forbid, the same request is allowed.
        let e = engine_with(Some(&schema), Some("permit(principal, action, resource);")).unwrap();
        assert!(e.decide(&input(&subject, "low"), &["x".into()])[0].allowed);
    }

    #[test]
    fn shipped_example_validates() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policy/tessera.cedar");
        let e = Engine::load(Some(&p), None).unwrap();
        assert_eq!(e.len(), 4);
        // Its write permit pins the subject as its read permit does: a token from another
        // trusted issuer (here a CI's, which anyone can get) writes nothing.
        let ask = |subject: &[(String, String)], scope: &str| {
            let mut i = input(subject, "low");
            i.owner = "platform";
            i.audience = "https://tickets.example.com";
            e.decide(&i, &[scope.into()])[0].allowed
        };
        let s = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        let colleague = s(&[
            ("iss", "https://accounts.example.com"),
            ("sub", "u1"),
            ("email", "ann@example.com"),
            ("email_verified", "true"),
        ]);
        let stranger = s(&[
            ("iss", "https://token.actions.githubusercontent.com"),
            ("sub", "repo:attacker/x:ref:refs/heads/main"),
            ("repository", "attacker/x"),
        ]);
        for scope in ["tickets:read", "tickets:write"] {
            assert!(ask(&colleague, scope), "{scope}");
            assert!(!ask(&stranger, scope), "{scope}");
        }
    }

    #[test]
    fn reload_keeps_the_previous_policy_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.cedar");
        std::fs::write(&p, "permit(principal, action, resource);").unwrap();
        let e = Engine::load(Some(&p), None).unwrap();
        assert_eq!(e.reload().unwrap(), None, "unchanged file is not reloaded");
        std::fs::write(&p, "permit(principal, action, resource").unwrap();
        assert!(e.reload().is_err());
        let subj = vec![("iss".into(), "i".into()), ("sub".into(), "u".into())];
        assert!(e.decide(&input(&subj, "low"), &["x".into()])[0].allowed);
        std::fs::write(&p, "forbid(principal, action, resource);").unwrap();
        assert_eq!(e.reload().unwrap(), Some(1));
        assert!(!e.decide(&input(&subj, "low"), &["x".into()])[0].allowed);
        // A file removed while running leaves no permit in force (review AY-7); put back, it
        // is loaded again.
        std::fs::write(&p, "permit(principal, action, resource);").unwrap();
        assert_eq!(e.reload().unwrap(), Some(1));
        std::fs::remove_file(&p).unwrap();
        assert_eq!(e.reload().unwrap(), Some(0));
        assert!(!e.decide(&input(&subj, "low"), &["x".into()])[0].allowed);
        assert_eq!(e.reload().unwrap(), None, "still gone: nothing to report");
        std::fs::write(&p, "permit(principal, action, resource);").unwrap();
        assert_eq!(e.reload().unwrap(), Some(1));
        assert!(e.decide(&input(&subj, "low"), &["x".into()])[0].allowed);
        // A file others could write (review AY-6) is refused like a broken one: what is in
        // force stays, and a start refuses it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&p, "forbid(principal, action, resource);").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = e.reload().unwrap_err().to_string();
        assert!(
            err.contains("not writable by") && err.contains("mode 666"),
            "{err}"
        );
        assert!(e.decide(&input(&subj, "low"), &["x".into()])[0].allowed);
        assert!(Engine::load(Some(&p), None).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(e.reload().unwrap(), Some(1));
        assert!(!e.decide(&input(&subj, "low"), &["x".into()])[0].allowed);
    }
}
