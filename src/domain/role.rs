//! A worker role: which commands a `spiced worker` carries out. Parsed once, from `worker.roles`
//! or `--role`; an unknown name is refused there, never at run time.

use super::{AggregateType, CommandType};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Databases and ontology classes.
    Ontology,
    /// Instances.
    Instance,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Ontology, Role::Instance];

    pub fn name(self) -> &'static str {
        match self {
            Role::Ontology => "ontology",
            Role::Instance => "instance",
        }
    }

    /// The registry's handler name.
    pub fn handler(self) -> &'static str {
        match self {
            Role::Ontology => "ontology-worker",
            Role::Instance => "instance-worker",
        }
    }

    pub fn handles(self, command_type: CommandType) -> bool {
        let instance = command_type.aggregate_type() == AggregateType::Instance;
        instance == (self == Role::Instance)
    }

    pub fn for_command(command_type: CommandType) -> Role {
        if Role::Instance.handles(command_type) { Role::Instance } else { Role::Ontology }
    }
}

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL.into_iter().find(|role| role.name() == s).ok_or_else(|| UnknownRole(s.to_string()))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown worker role {0:?}; roles are ontology and instance")]
pub struct UnknownRole(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_nothing_else_does() {
        for role in Role::ALL {
            assert_eq!(role.name().parse::<Role>().unwrap(), role);
            let toml_value: Role = serde_json::from_value(serde_json::json!(role.name())).unwrap();
            assert_eq!(toml_value, role);
        }
        let err = "Instance".parse::<Role>().unwrap_err();
        assert_eq!(err.to_string(), "unknown worker role \"Instance\"; roles are ontology and instance");
    }
}
