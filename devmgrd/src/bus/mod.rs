//! What faces the bus: which bus devmgrd serves on (`choice`), the
//! dispatcher that answers every method call (`serve`), the pump that
//! publishes the model's events as signals before the replies they back
//! (`pump`), fd-held references (`handles`), who is calling (`peers`) and
//! whether they may (`authz`), and the engine's errors as the contract's
//! (`errors`). It reaches the model only through the owner's handle.

pub(crate) mod authz;
pub(crate) mod choice;
mod errors;
pub(crate) mod handles;
pub(crate) mod peers;
pub(crate) mod pump;
pub(crate) mod serve;
