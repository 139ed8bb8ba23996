//! nodecrypt node agent.
