#!/bin/bash
echo "e2e: the VM lane is not built yet (issue 6)"; exit 0
