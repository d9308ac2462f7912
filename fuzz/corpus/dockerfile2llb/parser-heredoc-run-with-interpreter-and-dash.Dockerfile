FROM busybox
RUN <<-EOT sh -e
	echo tabbed > /out
	EOT
