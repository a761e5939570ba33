//! ConPaaS runtime: manager, agent, client (filled by the runtime work).
