//! The evaluator of the OpenFGA test server: authorization models (schema 1.1, JSON form),
//! relationship tuples, and `Check` / `ListObjects` evaluated the way OpenFGA's
//! `LocalChecker` does it. Pure and synchronous; the HTTP side is in `server.rs`.
//!
//! What is modelled after OpenFGA v1.22 (`internal/graph`, `internal/validation`, the
//! engine `fga model test` embeds):
//!
//! - direct relations (`this`) with type restrictions: a stored tuple naming the user
//!   exactly (only when the user's type, or `type#relation` for a userset user, is an
//!   allowed restriction), a typed wildcard `type:*` of the user's type (never for a
//!   userset user), and userset tuples (`group:g#member`), resolved recursively;
//! - `computedUserset` (same object, no extra depth), `tupleToUserset` (each object the
//!   tupleset relation points to, skipped when its type lacks the computed relation),
//!   `union`, `intersection` and `difference`, with OpenFGA's rules for errors inside them;
//! - "self-defining" usersets: `group:g#member` always has `member` on `group:g`;
//! - cycle protection on the current resolution path: a cycle makes the branch `false`
//!   and is remembered, so an intersection or difference operand that met one counts as
//!   unknown and the operation is `false` (OpenFGA's `CycleDetected`);
//! - the shortcut of `PathExists`: a user whose type has no path to the relation in the
//!   model's graph is denied at once (and so reports no cycle);
//! - the resolution depth limit of 25 dispatches
//!   (`authorization_model_resolution_too_complex`);
//! - tuples that do not fit the model in use (e.g. written under an older model) are
//!   ignored when reading, as OpenFGA's `FilterInvalidTuples` does.
//!
//! ListObjects is Check over every candidate object, which is what OpenFGA's reverse
//! expansion computes. Not supported: conditions (ABAC); models and tuples using them
//! are refused. ListUsers and Expand are not implemented.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::{Map, Value, json};

/// OpenFGA's default `resolveNodeLimit`.
pub const RESOLVE_NODE_LIMIT: u32 = 25;

// ---------------------------------------------------------------------------------------
// the authorization model

/// A relation's rewrite rule (`Userset` in OpenFGA's protobuf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    This,
    Computed(String),
    TupleToUserset {
        tupleset: String,
        computed: String,
    },
    Union(Vec<Rewrite>),
    Intersection(Vec<Rewrite>),
    Difference {
        base: Box<Rewrite>,
        subtract: Box<Rewrite>,
    },
}

/// One entry of `directly_related_user_types`: `user`, `group#member` or `user:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeRestriction {
    pub type_name: String,
    pub relation: Option<String>,
    pub wildcard: bool,
}

impl TypeRestriction {
    fn describe(&self) -> String {
        match (&self.relation, self.wildcard) {
            (Some(r), _) => format!("{}#{r}", self.type_name),
            (None, true) => format!("{}:*", self.type_name),
            (None, false) => self.type_name.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RelationDef {
    pub rewrite: Rewrite,
    pub directly_related: Vec<TypeRestriction>,
}

#[derive(Debug, Clone, Default)]
pub struct TypeDef {
    pub relations: BTreeMap<String, RelationDef>,
}

/// A parsed and validated authorization model.
#[derive(Debug, Clone)]
pub struct Model {
    pub id: String,
    pub schema_version: String,
    pub types: BTreeMap<String, TypeDef>,
    /// `type_definitions` as written, returned by ReadAuthorizationModel.
    pub type_definitions: Value,
    /// `type#relation` -> every node of the model's graph it reaches (`type`, `type:*`,
    /// `type#relation`, itself included): OpenFGA's `PathExists`.
    reach: HashMap<String, HashSet<String>>,
}

/// Field of a protobuf JSON object under either of its names (`snake_case` or `lowerCamelCase`).
fn field<'a>(obj: &'a Map<String, Value>, snake: &str, camel: &str) -> Option<&'a Value> {
    obj.get(snake).or_else(|| obj.get(camel))
}

fn relation_name(v: Option<&Value>, what: &str) -> Result<String, String> {
    v.and_then(Value::as_object)
        .and_then(|o| o.get("relation"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("{what} is missing a relation"))
}

fn parse_rewrite(v: &Value) -> Result<Rewrite, String> {
    let obj = v
        .as_object()
        .ok_or("a relation rewrite must be an object")?;
    if obj.contains_key("this") {
        return Ok(Rewrite::This);
    }
    if let Some(cu) = field(obj, "computed_userset", "computedUserset") {
        return Ok(Rewrite::Computed(relation_name(
            Some(cu),
            "computedUserset",
        )?));
    }
    if let Some(ttu) = field(obj, "tuple_to_userset", "tupleToUserset") {
        let ttu = ttu.as_object().ok_or("tupleToUserset must be an object")?;
        return Ok(Rewrite::TupleToUserset {
            tupleset: relation_name(ttu.get("tupleset"), "tupleToUserset.tupleset")?,
            computed: relation_name(
                field(ttu, "computed_userset", "computedUserset"),
                "tupleToUserset.computedUserset",
            )?,
        });
    }
    let children = |v: &Value, what: &str| -> Result<Vec<Rewrite>, String> {
        let child = v
            .get("child")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{what} needs a `child` list"))?;
        if child.is_empty() {
            return Err(format!("{what} needs at least one child"));
        }
        child.iter().map(parse_rewrite).collect()
    };
    if let Some(u) = obj.get("union") {
        return Ok(Rewrite::Union(children(u, "union")?));
    }
    if let Some(i) = obj.get("intersection") {
        return Ok(Rewrite::Intersection(children(i, "intersection")?));
    }
    if let Some(d) = obj.get("difference") {
        let base = d.get("base").ok_or("difference needs a base")?;
        let subtract = d.get("subtract").ok_or("difference needs a subtract")?;
        return Ok(Rewrite::Difference {
            base: Box::new(parse_rewrite(base)?),
            subtract: Box::new(parse_rewrite(subtract)?),
        });
    }
    Err("unknown relation rewrite (expected this, computedUserset, tupleToUserset, union, intersection or difference)".into())
}

fn parse_restriction(v: &Value) -> Result<TypeRestriction, String> {
    let obj = v
        .as_object()
        .ok_or("a type restriction must be an object")?;
    let type_name = obj
        .get("type")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("a type restriction needs a type")?
        .to_owned();
    if obj
        .get("condition")
        .and_then(Value::as_str)
        .is_some_and(|c| !c.is_empty())
    {
        return Err("conditions are not supported by the OpenFGA test server".into());
    }
    let relation = obj
        .get("relation")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let wildcard = obj.get("wildcard").is_some_and(|w| !w.is_null());
    Ok(TypeRestriction {
        type_name,
        relation,
        wildcard,
    })
}

impl Model {
    /// Parses and validates a `WriteAuthorizationModel` body (or a model.json file). The
    /// error text is the message of an `invalid_authorization_model` error.
    pub fn parse(id: String, body: &Value) -> Result<Model, String> {
        let obj = body.as_object().ok_or("the model must be a JSON object")?;
        let schema_version = field(obj, "schema_version", "schemaVersion")
            .and_then(Value::as_str)
            .unwrap_or("1.1")
            .to_owned();
        if schema_version != "1.1" {
            return Err(format!(
                "invalid schema version `{schema_version}`: only 1.1 is supported"
            ));
        }
        if field(obj, "conditions", "conditions")
            .and_then(Value::as_object)
            .is_some_and(|c| !c.is_empty())
        {
            return Err("conditions are not supported by the OpenFGA test server".into());
        }
        let defs = field(obj, "type_definitions", "typeDefinitions")
            .and_then(Value::as_array)
            .filter(|d| !d.is_empty())
            .ok_or("the model needs at least one type definition")?;
        let mut types = BTreeMap::new();
        for def in defs {
            let def = def
                .as_object()
                .ok_or("a type definition must be an object")?;
            let name = def
                .get("type")
                .and_then(Value::as_str)
                .filter(|s| valid_type_name(s))
                .ok_or("a type definition needs a valid `type`")?
                .to_owned();
            let metadata = def
                .get("metadata")
                .and_then(|m| m.get("relations"))
                .and_then(Value::as_object);
            let mut relations = BTreeMap::new();
            if let Some(rels) = def.get("relations").and_then(Value::as_object) {
                for (rel, rewrite) in rels {
                    if !valid_relation_name(rel) {
                        return Err(format!("invalid relation name `{rel}` in type `{name}`"));
                    }
                    let directly_related = metadata
                        .and_then(|m| m.get(rel))
                        .and_then(|m| {
                            m.as_object().and_then(|m| {
                                field(m, "directly_related_user_types", "directlyRelatedUserTypes")
                            })
                        })
                        .and_then(Value::as_array)
                        .map(|list| list.iter().map(parse_restriction).collect())
                        .transpose()?
                        .unwrap_or_default();
                    relations.insert(
                        rel.clone(),
                        RelationDef {
                            rewrite: parse_rewrite(rewrite)?,
                            directly_related,
                        },
                    );
                }
            }
            if types.insert(name.clone(), TypeDef { relations }).is_some() {
                return Err(format!("the type `{name}` is defined more than once"));
            }
        }
        let mut model = Model {
            id,
            schema_version,
            types,
            type_definitions: Value::Array(defs.clone()),
            reach: HashMap::new(),
        };
        model.validate()?;
        model.reach = model.reachability();
        Ok(model)
    }

    /// The edges of OpenFGA's authorization model graph, from a relation to what its
    /// rewrite names (operators flattened: every operand counts).
    fn edges(&self, type_name: &str, rw: &Rewrite, rd: &RelationDef, out: &mut Vec<String>) {
        match rw {
            Rewrite::This => out.extend(rd.directly_related.iter().map(|r| r.describe())),
            Rewrite::Computed(c) => out.push(format!("{type_name}#{c}")),
            Rewrite::TupleToUserset { tupleset, computed } => {
                if let Some(ts) = self.relation(type_name, tupleset) {
                    for r in &ts.directly_related {
                        if self.relation(&r.type_name, computed).is_some() {
                            out.push(format!("{}#{computed}", r.type_name));
                        }
                    }
                }
            }
            Rewrite::Union(children) | Rewrite::Intersection(children) => {
                for c in children {
                    self.edges(type_name, c, rd, out);
                }
            }
            Rewrite::Difference { base, subtract } => {
                self.edges(type_name, base, rd, out);
                self.edges(type_name, subtract, rd, out);
            }
        }
    }

    fn reachability(&self) -> HashMap<String, HashSet<String>> {
        let mut reach = HashMap::new();
        for (type_name, def) in &self.types {
            for rel in def.relations.keys() {
                let start = format!("{type_name}#{rel}");
                let mut seen = HashSet::from([start.clone()]);
                let mut todo = vec![start.clone()];
                while let Some(node) = todo.pop() {
                    let Some((t, r)) = node.split_once('#') else {
                        continue; // a type or wildcard: a leaf
                    };
                    let Some(rd) = self.relation(t, r) else {
                        continue;
                    };
                    let mut next = Vec::new();
                    self.edges(t, &rd.rewrite, rd, &mut next);
                    for n in next {
                        if seen.insert(n.clone()) {
                            todo.push(n);
                        }
                    }
                }
                reach.insert(start, seen);
            }
        }
        reach
    }

    /// OpenFGA's `TypeSystem.PathExists`: can any tuples relate this user to
    /// `type#relation`? (A user `t:x` also through `t:*`; a userset `t:x#r` only as `t#r`.)
    fn path_exists(&self, user: &str, type_name: &str, relation: &str) -> bool {
        let Some(reach) = self.reach.get(&format!("{type_name}#{relation}")) else {
            return false;
        };
        let (uo, ur) = split_user(user);
        let ut = type_of(uo);
        match ur {
            Some(r) => reach.contains(&format!("{ut}#{r}")),
            None => reach.contains(ut) || reach.contains(&format!("{ut}:*")),
        }
    }

    /// The structural rules of OpenFGA's model validation that matter for evaluation:
    /// every referenced type and relation exists, assignable relations have type
    /// restrictions, tupleset relations are plain direct relations to objects.
    fn validate(&self) -> Result<(), String> {
        for (type_name, def) in &self.types {
            for (rel, rd) in &def.relations {
                let uses_this = rewrite_uses_this(&rd.rewrite);
                if uses_this && rd.directly_related.is_empty() {
                    return Err(format!(
                        "the assignable relation `{rel}` in type `{type_name}` needs at least one type restriction"
                    ));
                }
                if !uses_this && !rd.directly_related.is_empty() {
                    return Err(format!(
                        "the relation `{rel}` in type `{type_name}` has type restrictions but is not assignable"
                    ));
                }
                for r in &rd.directly_related {
                    let Some(target) = self.types.get(&r.type_name) else {
                        return Err(format!(
                            "`{type_name}#{rel}` allows the undefined type `{}`",
                            r.type_name
                        ));
                    };
                    if let Some(ur) = &r.relation {
                        if r.wildcard {
                            return Err(format!(
                                "`{type_name}#{rel}`: a type restriction cannot be a wildcard and a userset"
                            ));
                        }
                        if !target.relations.contains_key(ur) {
                            return Err(format!(
                                "`{type_name}#{rel}` allows the undefined relation `{}#{ur}`",
                                r.type_name
                            ));
                        }
                    }
                }
                self.validate_rewrite(type_name, rel, &rd.rewrite)?;
            }
        }
        Ok(())
    }

    fn validate_rewrite(&self, type_name: &str, rel: &str, rw: &Rewrite) -> Result<(), String> {
        match rw {
            Rewrite::This => Ok(()),
            Rewrite::Computed(c) => {
                if self.relation(type_name, c).is_none() {
                    return Err(format!(
                        "`{type_name}#{rel}` refers to the undefined relation `{type_name}#{c}`"
                    ));
                }
                Ok(())
            }
            Rewrite::TupleToUserset { tupleset, computed } => {
                let Some(ts) = self.relation(type_name, tupleset) else {
                    return Err(format!(
                        "`{type_name}#{rel}` refers to the undefined tupleset `{type_name}#{tupleset}`"
                    ));
                };
                if ts.rewrite != Rewrite::This
                    || ts
                        .directly_related
                        .iter()
                        .any(|r| r.relation.is_some() || r.wildcard)
                {
                    return Err(format!(
                        "the tupleset `{type_name}#{tupleset}` must be a direct relation to objects only"
                    ));
                }
                if !ts
                    .directly_related
                    .iter()
                    .any(|r| self.relation(&r.type_name, computed).is_some())
                {
                    return Err(format!(
                        "`{type_name}#{rel}`: no type of `{type_name}#{tupleset}` defines `{computed}`"
                    ));
                }
                Ok(())
            }
            Rewrite::Union(children) | Rewrite::Intersection(children) => children
                .iter()
                .try_for_each(|c| self.validate_rewrite(type_name, rel, c)),
            Rewrite::Difference { base, subtract } => {
                self.validate_rewrite(type_name, rel, base)?;
                self.validate_rewrite(type_name, rel, subtract)
            }
        }
    }

    pub fn relation(&self, type_name: &str, relation: &str) -> Option<&RelationDef> {
        self.types.get(type_name)?.relations.get(relation)
    }

    /// Whether `type#relation` is used as the tupleset of a `tupleToUserset` rewrite.
    pub fn is_tupleset(&self, type_name: &str, relation: &str) -> bool {
        fn uses(rw: &Rewrite, relation: &str) -> bool {
            match rw {
                Rewrite::TupleToUserset { tupleset, .. } => tupleset == relation,
                Rewrite::Union(c) | Rewrite::Intersection(c) => c.iter().any(|c| uses(c, relation)),
                Rewrite::Difference { base, subtract } => {
                    uses(base, relation) || uses(subtract, relation)
                }
                Rewrite::This | Rewrite::Computed(_) => false,
            }
        }
        self.types
            .get(type_name)
            .is_some_and(|t| t.relations.values().any(|r| uses(&r.rewrite, relation)))
    }

    /// The model as ReadAuthorizationModel returns it.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "schema_version": self.schema_version,
            "type_definitions": self.type_definitions,
            "conditions": {},
        })
    }
}

fn rewrite_uses_this(rw: &Rewrite) -> bool {
    match rw {
        Rewrite::This => true,
        Rewrite::Union(c) | Rewrite::Intersection(c) => c.iter().any(rewrite_uses_this),
        Rewrite::Difference { base, subtract } => {
            rewrite_uses_this(base) || rewrite_uses_this(subtract)
        }
        Rewrite::Computed(_) | Rewrite::TupleToUserset { .. } => false,
    }
}

fn valid_type_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 254
        && !s.contains([':', '#', '@', '*'])
        && !s.contains(char::is_whitespace)
}

fn valid_relation_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 50
        && !s.contains([':', '#', '@', '*'])
        && !s.contains(char::is_whitespace)
}

// ---------------------------------------------------------------------------------------
// tuples

/// A relationship tuple `object#relation@user`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TupleKey {
    pub object: String,
    pub relation: String,
    pub user: String,
}

impl TupleKey {
    pub fn new(user: &str, relation: &str, object: &str) -> Self {
        TupleKey {
            object: object.to_owned(),
            relation: relation.to_owned(),
            user: user.to_owned(),
        }
    }

    /// OpenFGA's JSON form, `{"user", "relation", "object"}`, as Write takes it.
    pub fn to_json(&self) -> Value {
        json!({"user": self.user, "relation": self.relation, "object": self.object})
    }
}

impl std::fmt::Display for TupleKey {
    /// OpenFGA's `TupleKeyToString`: `object#relation@user`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}@{}", self.object, self.relation, self.user)
    }
}

/// A set of tuples indexed by `object#relation`.
#[derive(Debug, Clone, Default)]
pub struct Tuples {
    by_object_relation: HashMap<String, BTreeSet<String>>,
    len: usize,
}

impl Tuples {
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = &'a TupleKey>) -> Self {
        let mut t = Tuples::default();
        for k in keys {
            t.insert(k);
        }
        t
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, k: &TupleKey) -> bool {
        self.by_object_relation
            .get(&format!("{}#{}", k.object, k.relation))
            .is_some_and(|users| users.contains(&k.user))
    }

    /// Returns false if the tuple was already there.
    pub fn insert(&mut self, k: &TupleKey) -> bool {
        let added = self
            .by_object_relation
            .entry(format!("{}#{}", k.object, k.relation))
            .or_default()
            .insert(k.user.clone());
        if added {
            self.len += 1;
        }
        added
    }

    /// Returns false if the tuple was not there.
    pub fn remove(&mut self, k: &TupleKey) -> bool {
        let key = format!("{}#{}", k.object, k.relation);
        let Some(users) = self.by_object_relation.get_mut(&key) else {
            return false;
        };
        let removed = users.remove(&k.user);
        if users.is_empty() {
            self.by_object_relation.remove(&key);
        }
        if removed {
            self.len -= 1;
        }
        removed
    }

    pub fn users<'s>(
        &'s self,
        object: &str,
        relation: &str,
    ) -> impl Iterator<Item = &'s str> + use<'s> {
        self.by_object_relation
            .get(&format!("{object}#{relation}"))
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// Every tuple, sorted by object, relation, user.
    pub fn keys(&self) -> Vec<TupleKey> {
        let mut out: Vec<TupleKey> = self
            .by_object_relation
            .iter()
            .flat_map(|(or, users)| {
                let (object, relation) = or.rsplit_once('#').unwrap_or((or.as_str(), ""));
                users
                    .iter()
                    .map(move |u| TupleKey::new(u, relation, object))
            })
            .collect();
        out.sort();
        out
    }

    /// Every object of `type_name` that appears in a tuple (as object or as user).
    fn objects_of_type(&self, type_name: &str, out: &mut BTreeSet<String>) {
        for (or, users) in &self.by_object_relation {
            let object = or.rsplit_once('#').map_or(or.as_str(), |(o, _)| o);
            if type_of(object) == type_name {
                out.insert(object.to_owned());
            }
            for u in users {
                let (uo, _) = split_user(u);
                if type_of(uo) == type_name && !uo.ends_with(":*") {
                    out.insert(uo.to_owned());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// strings: `type:id`, `type:id#relation`, `type:*`

pub fn type_of(object: &str) -> &str {
    object.split_once(':').map_or("", |(t, _)| t)
}

/// `group:g#member` -> (`group:g`, Some(`member`)); `user:u` -> (`user:u`, None).
pub fn split_user(user: &str) -> (&str, Option<&str>) {
    match user.rsplit_once('#') {
        Some((o, r)) => (o, Some(r)),
        None => (user, None),
    }
}

fn is_valid_object(s: &str) -> bool {
    match s.split_once(':') {
        Some((t, id)) => {
            !t.is_empty()
                && !id.is_empty()
                && !s.contains(['#', '@'])
                && !id.contains(':')
                && !s.contains(char::is_whitespace)
        }
        None => false,
    }
}

fn is_typed_wildcard(s: &str) -> bool {
    s.split_once(':')
        .is_some_and(|(t, id)| !t.is_empty() && id == "*")
}

// ---------------------------------------------------------------------------------------
// validation of tuples and requests (OpenFGA's messages)

/// Why a tuple or request does not fit the model. `Display` gives OpenFGA's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    TypeNotFound(String),
    RelationNotFound { type_name: String, relation: String },
    Other(String),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::TypeNotFound(t) => write!(f, "type '{t}' not found"),
            Invalid::RelationNotFound {
                type_name,
                relation,
            } => write!(f, "relation '{type_name}#{relation}' not found"),
            Invalid::Other(m) => f.write_str(m),
        }
    }
}

impl Model {
    /// OpenFGA's `ValidateUser` for a 1.1 model.
    pub fn validate_user(&self, user: &str) -> Result<(), Invalid> {
        let (obj, rel) = split_user(user);
        let well_formed = match rel {
            Some(r) => is_valid_object(obj) && valid_relation_name(r),
            None => is_valid_object(user),
        };
        if user.is_empty() || user.contains(char::is_whitespace) || !well_formed {
            return Err(Invalid::Other(
                "the 'user' field must be an object (e.g. document:1) or an 'object#relation' or a typed wildcard (e.g. group:*)".into(),
            ));
        }
        if rel.is_some() && is_typed_wildcard(obj) {
            return Err(Invalid::Other(
                "the 'user' field cannot reference a typed wildcard in a userset value".into(),
            ));
        }
        let ut = type_of(obj);
        if !self.types.contains_key(ut) {
            return Err(Invalid::TypeNotFound(ut.to_owned()));
        }
        if let Some(r) = rel
            && self.relation(ut, r).is_none()
        {
            return Err(Invalid::RelationNotFound {
                type_name: ut.to_owned(),
                relation: r.to_owned(),
            });
        }
        Ok(())
    }

    /// OpenFGA's `ValidateUserObjectRelation`: what Check requires of its tuple key.
    pub fn validate_user_object_relation(
        &self,
        user: &str,
        relation: &str,
        object: &str,
    ) -> Result<(), Invalid> {
        self.validate_user(user)?;
        if !is_valid_object(object) {
            return Err(Invalid::Other("invalid 'object' field format".into()));
        }
        if is_typed_wildcard(object) {
            return Err(Invalid::Other(
                "the 'object' field cannot reference a typed wildcard".into(),
            ));
        }
        let ot = type_of(object);
        if !self.types.contains_key(ot) {
            return Err(Invalid::TypeNotFound(ot.to_owned()));
        }
        if !valid_relation_name(relation) {
            return Err(Invalid::Other("the 'relation' field is malformed".into()));
        }
        if self.relation(ot, relation).is_none() {
            return Err(Invalid::RelationNotFound {
                type_name: ot.to_owned(),
                relation: relation.to_owned(),
            });
        }
        Ok(())
    }

    /// OpenFGA's `ValidateTuple`: well formed, and allowed by the type restrictions and
    /// tupleset rules of this model. Used for writes and contextual tuples, and to
    /// ignore stored tuples that do not fit the model in use.
    pub fn validate_tuple(&self, t: &TupleKey) -> Result<(), Invalid> {
        self.validate_parts(&t.user, &t.relation, &t.object)
    }

    fn validate_parts(&self, user: &str, relation: &str, object: &str) -> Result<(), Invalid> {
        self.validate_user_object_relation(user, relation, object)?;
        let ot = type_of(object);
        let (uo, ur) = split_user(user);
        if self.is_tupleset(ot, relation) && (ur.is_some() || is_typed_wildcard(uo)) {
            return Err(Invalid::Other(if is_typed_wildcard(uo) {
                format!("unexpected wildcard relationship with tupleset relation '{ot}#{relation}'")
            } else {
                format!("unexpected user '{user}' with tupleset relation '{ot}#{relation}'")
            }));
        }
        let Some(rd) = self.relation(ot, relation) else {
            return Err(Invalid::RelationNotFound {
                type_name: ot.to_owned(),
                relation: relation.to_owned(),
            });
        };
        let ut = type_of(uo);
        let allowed = if let Some(ur) = ur {
            rd.directly_related
                .iter()
                .any(|r| r.type_name == ut && r.relation.as_deref() == Some(ur))
        } else if is_typed_wildcard(uo) {
            rd.directly_related
                .iter()
                .any(|r| r.type_name == ut && r.wildcard)
        } else {
            rd.directly_related
                .iter()
                .any(|r| r.type_name == ut && !r.wildcard && r.relation.is_none())
        };
        if !allowed {
            let what = match ur {
                Some(ur) => format!("'{ut}#{ur}' is not an allowed type restriction"),
                None if is_typed_wildcard(uo) => {
                    format!("the typed wildcard '{uo}' is not an allowed type restriction")
                }
                None => format!("type '{ut}' is not an allowed type restriction"),
            };
            return Err(Invalid::Other(format!("{what} for '{ot}#{relation}'")));
        }
        Ok(())
    }

    /// Whether a stored tuple is read under this model (OpenFGA's `FilterInvalidTuples`).
    fn fits(&self, user: &str, relation: &str, object: &str) -> bool {
        self.validate_parts(user, relation, object).is_ok()
    }
}

// ---------------------------------------------------------------------------------------
// evaluation

/// Evaluation failed (OpenFGA answers `authorization_model_resolution_too_complex`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolutionTooComplex;

/// The result of resolving one `object#relation@user`, as OpenFGA's
/// `ResolveCheckResponse`: besides `allowed`, whether a cycle was met on the way to a
/// `false`. The flag matters: an intersection or a difference whose operand met a cycle
/// is `false` (OpenFGA cannot tell the operand's real value), so `x but not blocked` is
/// denied when `blocked` ran into a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resolution {
    allowed: bool,
    cycle: bool,
}

const ALLOWED: Resolution = Resolution {
    allowed: true,
    cycle: false,
};
const DENIED: Resolution = Resolution {
    allowed: false,
    cycle: false,
};
const CYCLE: Resolution = Resolution {
    allowed: false,
    cycle: true,
};

type Outcome = Result<Resolution, ResolutionTooComplex>;

/// OpenFGA's `union` and `consumeDispatches`: the first allowed wins; otherwise an
/// error if there was one, else `false` carrying any cycle seen.
fn any_allowed(outcomes: impl IntoIterator<Item = Outcome>) -> Outcome {
    let mut cycle = false;
    let mut failure = None;
    for o in outcomes {
        match o {
            Ok(r) if r.allowed => return Ok(ALLOWED),
            Ok(r) => cycle |= r.cycle,
            Err(e) => failure = Some(e),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(Resolution {
            allowed: false,
            cycle,
        }),
    }
}

/// Check and ListObjects over stored tuples plus a request's contextual tuples.
pub struct Evaluator<'a> {
    model: &'a Model,
    stored: &'a Tuples,
    contextual: Option<&'a Tuples>,
}

impl<'a> Evaluator<'a> {
    pub fn new(model: &'a Model, stored: &'a Tuples, contextual: Option<&'a Tuples>) -> Self {
        Evaluator {
            model,
            stored,
            contextual,
        }
    }

    /// Users of `object#relation` in stored and contextual tuples that fit the model.
    fn users(&self, object: &str, relation: &str) -> Vec<&'a str> {
        let mut out: Vec<&'a str> = self.stored.users(object, relation).collect();
        if let Some(c) = self.contextual {
            out.extend(c.users(object, relation));
        }
        out.retain(|u| self.model.fits(u, relation, object));
        out
    }

    fn has_tuple(&self, user: &str, relation: &str, object: &str) -> bool {
        let k = TupleKey::new(user, relation, object);
        (self.stored.contains(&k) || self.contextual.is_some_and(|c| c.contains(&k)))
            && self.model.fits(user, relation, object)
    }

    /// `Check(user, relation, object)`. The request must have been validated with
    /// [`Model::validate_user_object_relation`].
    pub fn check(
        &self,
        user: &str,
        relation: &str,
        object: &str,
    ) -> Result<bool, ResolutionTooComplex> {
        self.resolve(object, relation, user, 0, &mut HashSet::new())
            .map(|r| r.allowed)
    }

    /// The objects ListObjects has to consider, sorted: every object of the type that
    /// appears in a tuple (as object or user), and the user's own object when the user
    /// is a userset of that type (self-defining). No other object can pass Check.
    pub fn candidates(&self, type_name: &str, user: &str) -> Vec<String> {
        let mut out = BTreeSet::new();
        self.stored.objects_of_type(type_name, &mut out);
        if let Some(c) = self.contextual {
            c.objects_of_type(type_name, &mut out);
        }
        let (uo, ur) = split_user(user);
        if ur.is_some() && type_of(uo) == type_name {
            out.insert(uo.to_owned());
        }
        out.into_iter().collect()
    }

    /// OpenFGA's `ResolveCheck`: depth limit, cycle detection on the current path,
    /// self-defining usersets, then the relation's rewrite.
    fn resolve(
        &self,
        object: &str,
        relation: &str,
        user: &str,
        depth: u32,
        path: &mut HashSet<String>,
    ) -> Outcome {
        if depth >= RESOLVE_NODE_LIMIT {
            return Err(ResolutionTooComplex);
        }
        let key = format!("{object}#{relation}@{user}");
        if path.contains(&key) {
            return Ok(CYCLE); // not an error: the branch is false, and says why
        }
        let (uo, ur) = split_user(user);
        if ur == Some(relation) && uo == object {
            return Ok(ALLOWED); // self-defining: `group:g#member` is a member of `group:g`
        }
        let Some(rd) = self.model.relation(type_of(object), relation) else {
            return Ok(DENIED);
        };
        if !self.model.path_exists(user, type_of(object), relation) {
            // no tuples could relate them: false, and no cycle to report either
            return Ok(DENIED);
        }
        path.insert(key.clone());
        let outcome = self.rewrite(&rd.rewrite, rd, object, relation, user, depth, path);
        path.remove(&key);
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    fn rewrite(
        &self,
        rw: &Rewrite,
        rd: &RelationDef,
        object: &str,
        relation: &str,
        user: &str,
        depth: u32,
        path: &mut HashSet<String>,
    ) -> Outcome {
        match rw {
            Rewrite::This => self.direct(rd, object, relation, user, depth, path),
            // same object, no dispatch: the depth does not grow
            Rewrite::Computed(c) => self.resolve(object, c, user, depth, path),
            Rewrite::TupleToUserset { tupleset, computed } => {
                let parents = self.users(object, tupleset);
                let mut outcomes = Vec::new();
                for parent in parents {
                    let (parent, _) = split_user(parent);
                    if self.model.relation(type_of(parent), computed).is_none() {
                        continue; // OpenFGA skips tupleset types without the relation
                    }
                    let o = self.resolve(parent, computed, user, depth + 1, path);
                    let allowed = matches!(o, Ok(r) if r.allowed);
                    outcomes.push(o);
                    if allowed {
                        break;
                    }
                }
                any_allowed(outcomes)
            }
            Rewrite::Union(children) => {
                let mut outcomes = Vec::new();
                for c in children {
                    let o = self.rewrite(c, rd, object, relation, user, depth, path);
                    let allowed = matches!(o, Ok(r) if r.allowed);
                    outcomes.push(o);
                    if allowed {
                        break;
                    }
                }
                any_allowed(outcomes)
            }
            Rewrite::Intersection(children) => {
                // a false operand, or one that met a cycle, decides; errors only otherwise
                let mut failure = None;
                for c in children {
                    match self.rewrite(c, rd, object, relation, user, depth, path) {
                        Ok(r) if r.cycle || !r.allowed => {
                            return Ok(Resolution {
                                allowed: false,
                                cycle: r.cycle,
                            });
                        }
                        Ok(_) => {}
                        Err(e) => failure = failure.or(Some(e)),
                    }
                }
                failure.map_or(Ok(ALLOWED), Err)
            }
            Rewrite::Difference { base, subtract } => {
                let b = self.rewrite(base, rd, object, relation, user, depth, path);
                if let Ok(r) = b
                    && (r.cycle || !r.allowed)
                {
                    return Ok(Resolution {
                        allowed: false,
                        cycle: r.cycle,
                    });
                }
                let s = self.rewrite(subtract, rd, object, relation, user, depth, path);
                if let Ok(r) = s
                    && (r.cycle || r.allowed)
                {
                    return Ok(Resolution {
                        allowed: false,
                        cycle: r.cycle,
                    });
                }
                b?;
                s?;
                Ok(ALLOWED)
            }
        }
    }

    /// `this`: OpenFGA's `checkDirect`, the union of the exact tuple, a typed wildcard
    /// and the userset tuples of `object#relation`.
    fn direct(
        &self,
        rd: &RelationDef,
        object: &str,
        relation: &str,
        user: &str,
        depth: u32,
        path: &mut HashSet<String>,
    ) -> Outcome {
        let (uo, ur) = split_user(user);
        let user_type = type_of(uo);
        // the exact tuple, when the user's type (or userset type) may be related directly
        if rd
            .directly_related
            .iter()
            .any(|r| !r.wildcard && r.type_name == user_type && r.relation.as_deref() == ur)
            && self.has_tuple(user, relation, object)
        {
            return Ok(ALLOWED);
        }
        // a typed wildcard of the user's type; never for a userset user
        let wildcard = format!("{user_type}:*");
        if ur.is_none()
            && rd
                .directly_related
                .iter()
                .any(|r| r.wildcard && r.type_name == user_type)
            && self.has_tuple(&wildcard, relation, object)
        {
            return Ok(ALLOWED);
        }
        // usersets related to the object, each resolved for the user (a dispatch)
        let usersets: Vec<&str> = self
            .users(object, relation)
            .into_iter()
            .filter(|u| u.contains('#'))
            .collect();
        let mut outcomes = Vec::new();
        for us in usersets {
            let (so, sr) = split_user(us);
            let Some(sr) = sr else { continue };
            let o = self.resolve(so, sr, user, depth + 1, path);
            let allowed = matches!(o, Ok(r) if r.allowed);
            outcomes.push(o);
            if allowed {
                break;
            }
        }
        any_allowed(outcomes)
    }
}
