//! Services a VM's spec declares for its guest agent's watchdog: checked
//! when the VM is created, sent to quetzal-agent on its port.

use quetzal_api::WatchedService;
use quetzal_qga::port::{MAX_SERVICES, Run, Service};

const MAX_COMMAND: usize = 4096;

fn plain(text: &str, extra: &[u8]) -> bool {
    (1..=64).contains(&text.len())
        && text.as_bytes()[0].is_ascii_alphanumeric()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b) || extra.contains(&b))
}

/// The request's services, or why they cannot be watched.
pub fn check(services: &[WatchedService]) -> Result<(), String> {
    if services.len() > MAX_SERVICES {
        return Err(format!(
            "at most {MAX_SERVICES} services can be watched, not {}",
            services.len()
        ));
    }
    for (index, service) in services.iter().enumerate() {
        let name = &service.name;
        if !plain(name, b"") {
            return Err(format!(
                "service name {name:?} must be 1 to 64 letters, digits, '-', '_', '.' or '@', starting with a letter or digit"
            ));
        }
        if services[..index].iter().any(|other| &other.name == name) {
            return Err(format!("service {name} is declared twice"));
        }
        match (&service.unit, &service.command) {
            (Some(unit), None) if !plain(unit, b":") => {
                return Err(format!(
                    "service {name}: {unit:?} is not a systemd unit name"
                ));
            }
            (None, Some(command))
                if command.trim().is_empty()
                    || command.len() > MAX_COMMAND
                    || command.contains('\0') =>
            {
                return Err(format!(
                    "service {name}: its command must be 1 to {MAX_COMMAND} bytes, without NUL"
                ));
            }
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(format!(
                    "service {name} needs exactly one of unit and command"
                ));
            }
        }
    }
    Ok(())
}

/// The services as the agent's port carries them.
pub fn to_port(services: &[WatchedService]) -> Vec<Service> {
    services
        .iter()
        .filter_map(|service| {
            let run = match (&service.unit, &service.command) {
                (Some(unit), _) => Run::Unit(unit.clone()),
                (None, Some(command)) => Run::Command(command.clone()),
                (None, None) => return None,
            };
            Some(Service {
                name: service.name.clone(),
                run,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, unit: &str) -> WatchedService {
        WatchedService {
            name: name.into(),
            unit: Some(unit.into()),
            command: None,
        }
    }

    #[test]
    fn takes_units_and_commands_and_refuses_what_the_agent_could_not_run() {
        let command = WatchedService {
            name: "tick".into(),
            unit: None,
            command: Some("while true; do sleep 1; done".into()),
        };
        assert_eq!(
            check(&[unit("web", "nginx.service"), command.clone()]),
            Ok(())
        );
        assert_eq!(
            to_port(&[command])[0].run,
            Run::Command("while true; do sleep 1; done".into())
        );

        let both = WatchedService {
            command: Some("x".into()),
            ..unit("both", "x.service")
        };
        let neither = WatchedService {
            unit: None,
            ..unit("neither", "")
        };
        let cases = [
            (vec![unit("bad name", "x.service")], "service name"),
            (vec![unit("web", "x y")], "not a systemd unit name"),
            (vec![unit("web", "a"), unit("web", "b")], "declared twice"),
            (vec![both], "exactly one"),
            (vec![neither], "exactly one"),
            (
                (0..17).map(|i| unit(&format!("s{i}"), "a")).collect(),
                "at most 16",
            ),
        ];
        for (services, said) in cases {
            let refused = check(&services).unwrap_err();
            assert!(refused.contains(said), "{refused}");
        }
    }
}
