//! What a lease commit does: the device recorded, its model's default
//! image obtained, the device made a node.
