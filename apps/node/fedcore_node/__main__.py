from fedcore_node.cli import main

raise SystemExit(main())
