from fedcore_node._launch import main

raise SystemExit(main())
