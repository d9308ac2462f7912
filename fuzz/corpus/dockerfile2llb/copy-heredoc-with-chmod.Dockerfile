FROM scratch
COPY --chmod=0755 <<EOF /s.sh
#!/bin/sh
echo hi
EOF
