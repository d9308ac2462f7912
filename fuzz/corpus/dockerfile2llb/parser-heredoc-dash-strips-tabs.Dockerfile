FROM busybox
RUN <<-EOF
	echo tab > /tab
	EOF
COPY <<-EOT /t.txt
	indented
	EOT
