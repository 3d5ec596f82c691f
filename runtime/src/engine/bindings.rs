//! Host-side bindings for the `sluice:plugin/handler` world.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "sluice:plugin/handler",
    imports: { default: async },
    exports: { default: async },
});
