//! Per-node parts of a cluster-wide file.
//!
//! One `oned.conf` for the whole zone still needs the right `SERVER_ID` on
//! each server: the job Augeas does for `onezone serversync`. A file pushed
//! as a template may use, and only these:
//!
//! - `{{id}}` (the server's Raft id), `{{id0}}` (id - 1, for 0-based
//!   numbering such as OpenNebula's), `{{name}}`, `{{address}}` (its
//!   address on the cluster network); spaces inside the braces are allowed;
//! - `{{#node 1,3}}` ... `{{/node}}`: text kept only on the listed ids
//!   (blocks do not nest);
//! - `{{{{` for a literal `{{`.
//!
//! Anything else between `{{` and `}}` is an error naming its line and
//! column, found when the file is pushed, not when a server renders it.
//! Files not pushed as templates are copied byte for byte.

use std::fmt::Write as _;

/// What a template can ask about the server rendering it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeVars {
    pub id: u64,
    pub name: String,
    pub address: String,
}

impl NodeVars {
    /// A member as the zone lists it (`Status`): `address` is the host
    /// part of its peer endpoint, without brackets for IPv6. zone-sync
    /// renders with these, and `zonectl config diff` renders the same way.
    pub fn from_member(id: u64, name: &str, peer_endpoint: &str) -> NodeVars {
        let address = peer_endpoint
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
            .unwrap_or_default();
        NodeVars {
            id,
            name: name.to_owned(),
            address,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template line {line}, column {column}: {problem}")]
pub struct TemplateError {
    pub line: usize,
    pub column: usize,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Var {
    Id,
    Id0,
    Name,
    Address,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(Var),
    /// Text and variables kept only on these ids.
    Node(Vec<u64>, Vec<Piece>),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

fn position(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let err = |at: usize, problem: String| {
            let (line, column) = position(text, at);
            TemplateError {
                line,
                column,
                problem,
            }
        };
        let mut top: Vec<Piece> = Vec::new();
        // While inside a node block: its ids, its pieces, where it opened.
        let mut block: Option<(Vec<u64>, Vec<Piece>, usize)> = None;
        let mut i = 0;
        let mut literal = String::new();
        let push_text = |lit: &mut String, out: &mut Vec<Piece>| {
            if !lit.is_empty() {
                out.push(Piece::Text(std::mem::take(lit)));
            }
        };
        while i < text.len() {
            let rest = &text[i..];
            if rest.starts_with("{{{{") {
                literal.push_str("{{");
                i += 4;
                continue;
            }
            if !rest.starts_with("{{") {
                let ch = rest.chars().next().expect("not at the end");
                literal.push(ch);
                i += ch.len_utf8();
                continue;
            }
            let Some(end) = rest.find("}}") else {
                return Err(err(i, "`{{` is never closed by `}}`".into()));
            };
            let tag = rest[2..end].trim();
            let out = match block.as_mut() {
                Some((_, pieces, _)) => pieces,
                None => &mut top,
            };
            push_text(&mut literal, out);
            if let Some(list) = tag.strip_prefix("#node") {
                if block.is_some() {
                    return Err(err(i, "node blocks do not nest".into()));
                }
                let ids = list
                    .split(',')
                    .map(|s| s.trim().parse::<u64>().ok().filter(|&n| n > 0))
                    .collect::<Option<Vec<u64>>>()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        err(
                            i,
                            format!("`{{{{{tag}}}}}`: expected `#node` and ids, as in {{{{#node 1,3}}}}"),
                        )
                    })?;
                block = Some((ids, Vec::new(), i));
            } else if tag == "/node" {
                let Some((ids, pieces, _)) = block.take() else {
                    return Err(err(i, "`{{/node}}` without `{{#node ...}}`".into()));
                };
                top.push(Piece::Node(ids, pieces));
            } else {
                let var = match tag {
                    "id" => Var::Id,
                    "id0" => Var::Id0,
                    "name" => Var::Name,
                    "address" => Var::Address,
                    other => {
                        return Err(err(
                            i,
                            format!(
                                "unknown `{{{{{other}}}}}` (known: id, id0, name, address, #node, /node; `{{{{{{{{` is a literal `{{{{`)"
                            ),
                        ))
                    }
                };
                out.push(Piece::Var(var));
            }
            i += end + 2;
        }
        if let Some((_, _, at)) = block {
            return Err(err(
                at,
                "`{{#node ...}}` is never closed by `{{/node}}`".into(),
            ));
        }
        push_text(&mut literal, &mut top);
        Ok(Template(top))
    }

    pub fn render(&self, node: &NodeVars) -> String {
        let mut out = String::new();
        render_pieces(&self.0, node, &mut out);
        out
    }
}

fn render_pieces(pieces: &[Piece], node: &NodeVars, out: &mut String) {
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Var(Var::Id) => {
                let _ = write!(out, "{}", node.id);
            }
            Piece::Var(Var::Id0) => {
                let _ = write!(out, "{}", node.id.saturating_sub(1));
            }
            Piece::Var(Var::Name) => out.push_str(&node.name),
            Piece::Var(Var::Address) => out.push_str(&node.address),
            Piece::Node(ids, inner) => {
                if ids.contains(&node.id) {
                    render_pieces(inner, node, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_address_is_its_peer_host() {
        let v = NodeVars::from_member(2, "fe-2", "10.0.0.2:7401");
        assert_eq!(v.address, "10.0.0.2");
        assert_eq!(v.name, "fe-2");
        assert_eq!(
            NodeVars::from_member(3, "x", "[fd00::3]:7401").address,
            "fd00::3"
        );
    }

    fn node(id: u64) -> NodeVars {
        NodeVars {
            id,
            name: format!("front-{id}"),
            address: format!("10.0.0.1{id}"),
        }
    }

    #[test]
    fn renders_per_node_values() {
        let t = Template::parse(
            "FEDERATION = [\n  MODE = \"STANDALONE\",\n  SERVER_ID = {{ id0 }}\n]\n# {{name}} at {{address}}, raft id {{id}}\n",
        )
        .unwrap();
        assert_eq!(
            t.render(&node(2)),
            "FEDERATION = [\n  MODE = \"STANDALONE\",\n  SERVER_ID = 1\n]\n# front-2 at 10.0.0.12, raft id 2\n"
        );
    }

    #[test]
    fn node_blocks_keep_text_on_the_listed_ids_only() {
        let t = Template::parse("a\n{{#node 1,3}}only 1 and 3 ({{name}})\n{{/node}}b\n").unwrap();
        assert_eq!(t.render(&node(1)), "a\nonly 1 and 3 (front-1)\nb\n");
        assert_eq!(t.render(&node(2)), "a\nb\n");
        assert_eq!(t.render(&node(3)), "a\nonly 1 and 3 (front-3)\nb\n");
    }

    #[test]
    fn literal_braces_and_plain_text_pass_through() {
        let t = Template::parse("x = {{{{id}} é }} {\n").unwrap();
        assert_eq!(t.render(&node(1)), "x = {{id}} é }} {\n");
    }

    #[test]
    fn errors_say_where() {
        let e = Template::parse("ok\n  {{ hostname }}\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 3), "{e}");
        assert!(e.to_string().contains("unknown `{{hostname}}`"), "{e}");
        let e = Template::parse("a {{id").unwrap_err();
        assert!(e.problem.contains("never closed"), "{e}");
        let e = Template::parse("{{#node 1}}x").unwrap_err();
        assert!(e.problem.contains("never closed by `{{/node}}`"), "{e}");
        let e = Template::parse("{{/node}}").unwrap_err();
        assert!(e.problem.contains("without"), "{e}");
        let e = Template::parse("{{#node 1}}{{#node 2}}{{/node}}{{/node}}").unwrap_err();
        assert!(e.problem.contains("nest"), "{e}");
        let e = Template::parse("{{#node one}}{{/node}}").unwrap_err();
        assert!(e.problem.contains("expected `#node` and ids"), "{e}");
        let e = Template::parse("{{#node 0}}{{/node}}").unwrap_err();
        assert!(e.problem.contains("expected"), "{e}");
    }
}
