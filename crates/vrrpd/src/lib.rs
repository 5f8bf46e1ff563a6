//! vrrpd: the pure cores ([`packet`], the codec; [`fsm`], the RFC 5798 state
//! machine; [`members`], who may speak for the virtual router; [`setup`],
//! configuration to instance) and the thin I/O shell around them
//! ([`network`], [`addresses`], [`links`], [`router`], [`realtime`],
//! [`maintenance`], [`guard`]).

pub mod addresses;
pub mod fsm;
pub mod guard;
pub mod links;
pub mod maintenance;
pub mod members;
pub mod metrics;
pub mod network;
pub mod packet;
pub mod realtime;
pub mod router;
pub mod setup;
