from fedcore_researcher.cli import main

raise SystemExit(main())
