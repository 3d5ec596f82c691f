//! Host-side bindings for the worlds a plugin may be built for: sluice's own
//! `sluice:plugin/handler` and the proposal's `wasi:messaging`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "sluice:plugin/handler",
    imports: { default: async },
    exports: { default: async },
});

/// `sluice:plugin/batch-handler`: the same interfaces as `handler` (mapped to
/// its types, so one host implementation serves both) plus `handle-batch`.
pub mod batch {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "sluice:plugin/batch-handler",
        imports: { default: async },
        exports: { default: async },
        with: {
            "sluice:plugin/types": crate::engine::bindings::sluice::plugin::types,
            "sluice:plugin/host": crate::engine::bindings::sluice::plugin::host,
        },
    });
}

/// `wasi:messaging@0.2.0-draft`: the request-reply world imports everything
/// the core world does, so one linker serves both.
pub mod messaging {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wasi:messaging/messaging-request-reply",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "wasi:messaging/types.client": crate::engine::messaging::Client,
            "wasi:messaging/types.message": crate::engine::messaging::HeldMessage,
            "wasi:messaging/request-reply.request-options": crate::engine::messaging::RequestOptions,
        },
    });
}

/// `wasmcloud:messaging@0.2.0` handlers.
pub mod wasmcloud {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wasmcloud:messaging/handler-component",
        imports: { default: async },
        exports: { default: async },
    });
}
