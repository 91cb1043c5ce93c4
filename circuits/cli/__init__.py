"""The command line: one module per command group (`main`: models, graph, evaluate and the
entry point; `discover`; `tools`: verify, render, export, import, compare, tasks), helpers in
`common`. Arguments are parsed and checked before anything heavy is imported."""
