//! vrrpd: the pure cores ([`packet`], the codec; [`fsm`], the RFC 5798 state
//! machine; [`setup`], configuration to instance) and the thin I/O shell
//! around them ([`network`], [`addresses`], [`links`], [`router`]).

pub mod addresses;
pub mod fsm;
pub mod links;
pub mod metrics;
pub mod network;
pub mod packet;
pub mod router;
pub mod setup;
