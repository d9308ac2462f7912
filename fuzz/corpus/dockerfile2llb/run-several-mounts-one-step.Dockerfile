FROM busybox AS tools
RUN echo tool > /tool
FROM busybox
RUN --mount=type=bind,from=tools,source=/tool,target=/opt/tool --mount=type=tmpfs,target=/scratch --mount=type=cache,id=conf-multi,target=/var/cache/x sh -c 'cp /opt/tool /scratch/t && cat /scratch/t > /out'
