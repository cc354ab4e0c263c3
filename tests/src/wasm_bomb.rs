//! Compile bombs: components small on disk that are costly for cranelift to compile, for the
//! tests of bounded compilation (issue 12).
//!
//! The bomb is a component whose only content is a core module with one function. The function
//! gives each of `locals` i64 locals a value the compiler cannot fold (the parameter times a
//! constant), then reads every local back inside `depth` nested loops: each read looks the
//! local up through every loop header, so SSA construction and register allocation handle
//! `locals` x `depth` values from a body of `locals + depth` instructions. Nothing is
//! instantiated or exported: compiling is the whole attack, and it happens before any check of
//! what the component imports or exports.

use wasm_encoder::{
    CodeSection, Component, ExportKind, ExportSection, Function, FunctionSection, Module,
    ModuleSection, TypeSection, ValType,
};

/// A compile bomb: `locals` values live across `depth` nested loops.
pub fn compile_bomb(locals: u32, depth: u32) -> Vec<u8> {
    let mut types = TypeSection::new();
    types.ty().function([ValType::I64], [ValType::I64]);
    let mut functions = FunctionSection::new();
    functions.function(0);
    let mut exports = ExportSection::new();
    exports.export("bomb", ExportKind::Func, 0);

    let mut body = Function::new([(locals, ValType::I64)]);
    let mut code = body.instructions();
    // Local 0 is the parameter; locals 1..=locals get distinct values.
    for local in 1..=locals {
        code.local_get(0)
            .i64_const(i64::from(local))
            .i64_mul()
            .local_set(local);
    }
    for _ in 0..depth {
        code.loop_(wasm_encoder::BlockType::Empty);
    }
    // The sum of every local, inside the innermost loop.
    code.local_get(0);
    for local in 1..=locals {
        code.local_get(local).i64_add();
    }
    code.local_set(0);
    // Every local changes, and every loop is taken again: at each loop header, each local is
    // a value that differs by predecessor.
    for local in 1..=locals {
        code.local_get(local)
            .local_get(0)
            .i64_xor()
            .local_set(local);
    }
    for outer in 0..depth {
        code.local_get(0).i32_wrap_i64().br_if(outer);
    }
    for _ in 0..depth {
        code.end();
    }
    code.local_get(0).end();
    let mut bodies = CodeSection::new();
    bodies.function(&body);

    let mut module = Module::new();
    module
        .section(&types)
        .section(&functions)
        .section(&exports)
        .section(&bodies);
    let mut component = Component::new();
    component.section(&ModuleSection(&module));
    component.finish()
}
